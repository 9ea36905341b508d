# The image the Helm chart runs: kom-gateway on CPython 3.11, non-root, no shell needed.
#   docker build -t ghcr.io/kom-gateway/kom-gateway:0.1.0 .
# The builder stage compiles the nghttp2 HTTP/2 engine (gcc, Cython from PyPI, the runtime
# libnghttp2.so.14) and the compiled core (mypyc from PyPI); the runtime stage ships the
# wheel and that one library, no compiler.
FROM python:3.11-slim-bookworm AS build
# Not pinned to Debian revisions (hadolint DL3008): bookworm's security updates replace them
# in place, so a pin would break the next rebuild; the base image tag is what is pinned.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev libnghttp2-14 \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY kom_gateway ./kom_gateway
RUN pip wheel --no-cache-dir --wheel-dir /wheels ".[kubernetes]" \
    && python -c "import sys, zipfile, glob; w = glob.glob('/wheels/kom_gateway-*.whl')[0]; \
names = zipfile.ZipFile(w).namelist(); \
sys.exit(not all(any(p in n for n in names) for p in ('_nghttp2', 'kom_gateway_core__mypyc')))"

FROM python:3.11-slim-bookworm
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends libnghttp2-14 \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /wheels /wheels
# The Kubernetes client is for `kom-gateway rollout` with a configMap target (in-cluster).
# Versions are pinned by the wheels the build stage resolved: --no-index installs only those.
# hadolint ignore=DL3013
RUN pip install --no-cache-dir --no-index --find-links /wheels "kom-gateway[kubernetes]" \
    && rm -rf /wheels
# the config examples, for `kom-gateway check` inside the container
COPY config /usr/share/kom-gateway/config
USER 65532:65532
EXPOSE 8443 9090
ENTRYPOINT ["kom-gateway"]
CMD ["run", "--config", "/etc/kom-gateway/config/config.yaml"]
