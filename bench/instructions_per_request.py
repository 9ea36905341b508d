"""Instructions per proxied small GET, counted by valgrind's callgrind: the noise-free A/B
figure for one gateway process's CPU work (wall-clock CPU per request on a shared
machine moves by 2x between phases; this moves by 0.3%).

    python bench/instructions_per_request.py [--requests 5000] [--tls] [--haproxy] \
        [--keep DIR] [CODE_DIR ...]

Each CODE_DIR is a copy of the source tree (with its built extension), e.g. made with
`git worktree add` or `git archive`; none given: this tree. For each, nginx serves the
canned pod as in proxy_bench.py, the gateway runs under callgrind in front of it with
proxy_bench's config (every request moved by a cut-over rule), and after a 2,000-request
warm-up `h2load -c 10 -m 10` sends `--requests` with instrumentation on. User-space
instructions only: the kernel's share (socket reads and writes, ~10% of the CPU) is
not counted. Under valgrind the gateway is ~50x slower, so h2load keeps it saturated and
every read carries a full batch: the count is the saturated case's. `--tls`: clients
connect over TLS, as in proxy_bench's TLS runs (the upstream stays h2c). `--haproxy`:
HAProxy (proxy_bench's config, one thread) is counted first in the same way, the
baseline of proxy_bench's ratios without its noise. `--keep DIR`: the callgrind files
and logs are written to DIR and left there, for `callgrind_annotate --inclusive=yes`.

Needs valgrind (Debian `valgrind`), nginx and h2load.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import proxy_bench as pb
from e2e import free_port, is_ready

HERE = Path(__file__).resolve().parent.parent


def under_callgrind(command: list[str], ready: str | int, url: str, requests: int,
                    log: Path, out: Path, env: dict[str, str] | None = None,
                    cwd: Path | None = None) -> tuple[float, int]:
    """(instructions per request, requests answered) of `command` run under callgrind:
    started once `ready` (a line of its output, or a port that accepts) says so, warmed
    up with 2,000 requests, then counted over `requests` sent to `url`."""
    args = ["valgrind", "--tool=callgrind", "--instr-atstart=no",
            f"--callgrind-out-file={out}", *command]  # fmt: skip
    with open(log, "w") as sink:
        proc = subprocess.Popen(args, env=env, cwd=cwd, stdout=sink, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        line, port = (ready, None) if isinstance(ready, str) else (None, ready)
        while not is_ready(line, log, port):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{command[0]} under valgrind did not start:\n"
                                   f"{log.read_text()}")  # fmt: skip
            time.sleep(0.5)
        pb.h2load(url, 2000, 10, 10)
        control = ["callgrind_control", "-i"]
        subprocess.run([*control, "on", str(proc.pid)], check=True, capture_output=True)
        result = pb.h2load(url, requests, 10, 10)
        subprocess.run([*control, "off", str(proc.pid)], check=True, capture_output=True)
    finally:
        proc.terminate()
        proc.wait(120)
    total = 0
    for line in out.read_text().splitlines():
        if line.startswith("totals:"):
            total = int(line.split()[1])
    return total / requests, int(result["succeeded"])


def count(code: Path, root: Path, requests: int, tls: bool) -> tuple[float, int]:
    """(instructions per request, requests answered) of the gateway in `code`."""
    config = root / "gateway.yaml"
    if tls:
        config = root / "gateway-tls.yaml"
        config.write_text((root / "gateway.yaml").read_text() + "listen: {tls: {certFile: "
                          f"{root}/tls.crt, keyFile: {root}/tls.key}}}}\n")  # fmt: skip
    port, admin = free_port(), free_port()
    command = [sys.executable, "-m", "kom_gateway", "run", "--config", str(config),
               "--listen", f"127.0.0.1:{port}", "--admin", f"127.0.0.1:{admin}",
               "--log-level", "warning", "--engine", "nghttp2"]  # fmt: skip
    url = f"{'https' if tls else 'http'}://127.0.0.1:{port}{pb.SMALL_PATH}"
    # run from `code`: `python -m` puts the working directory first on sys.path
    return under_callgrind(command, "kom-gateway listening", url, requests,
                           root / f"gateway-{port}.out", root / f"callgrind-{port}",
                           env=dict(os.environ, PYTHONPATH=str(code)), cwd=code)  # fmt: skip


def count_haproxy(root: Path, upstream: int, requests: int, tls: bool) -> tuple[float, int]:
    """The same count for HAProxy with proxy_bench's config (one thread, the same path
    routing), the baseline the gateway's small GET is measured against."""
    port, tls_port = free_port(), free_port()
    config = root / "haproxy.cfg"
    config.write_text(pb.HAPROXY.format(port=port, tls_port=tls_port, upstream=upstream,
                                        root=root))  # fmt: skip
    url = (f"https://127.0.0.1:{tls_port}" if tls else f"http://127.0.0.1:{port}") + pb.SMALL_PATH
    return under_callgrind(["haproxy", "-f", str(config)], port, url, requests,
                           root / "haproxy.out", root / f"callgrind-haproxy-{port}")  # fmt: skip


def report(per_request: float, answered: int, requests: int, what: str) -> None:
    print(f"{per_request / 1000:7.1f} k instructions/request  "
          f"({answered} of {requests} answered)  {what}", flush=True)  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("code", nargs="*", type=Path, help="source trees (default: this one)")
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--tls", action="store_true", help="clients connect over TLS")
    parser.add_argument("--haproxy", action="store_true",
                        help="also count HAProxy (one thread) in front of the same upstream")
    parser.add_argument("--keep", type=Path, metavar="DIR",
                        help="write the callgrind files here and keep them (a new directory)")
    args = parser.parse_args()
    trees = [path.resolve() for path in args.code] or [HERE]
    with tempfile.TemporaryDirectory(prefix="kom-instr-") as tmp:
        root = Path(tmp)
        if args.keep:
            args.keep.mkdir(parents=True)
            root = args.keep.resolve()
        root.chmod(0o755)
        nginx, upstream = pb.serve_canned_pod(root)
        try:
            if args.haproxy:
                per_request, answered = count_haproxy(root, upstream, args.requests, args.tls)
                report(per_request, answered, args.requests, "HAProxy")
            for tree in trees:
                per_request, answered = count(tree, root, args.requests, args.tls)
                report(per_request, answered, args.requests, str(tree))
        finally:
            nginx.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
