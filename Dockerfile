# The image the Helm chart runs: kom-gateway on CPython 3.11, non-root, no shell needed.
#   docker build -t ghcr.io/kom-gateway/kom-gateway:0.1.0 .
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY kom_gateway ./kom_gateway
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
# the config examples, for `kom-gateway check` inside the container
COPY config /usr/share/kom-gateway/config
USER 65532:65532
EXPOSE 8443 9090
ENTRYPOINT ["kom-gateway"]
CMD ["run", "--config", "/etc/kom-gateway/config/config.yaml"]
