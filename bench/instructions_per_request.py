"""Instructions per proxied small GET, counted by valgrind's callgrind: the noise-free A/B
figure for one gateway process's CPU work (wall-clock CPU per request on a shared
machine moves by 2x between phases; this moves by 0.3%).

    python bench/instructions_per_request.py [--requests 5000] [--tls] [CODE_DIR ...]

Each CODE_DIR is a copy of the source tree (with its built extension), e.g. made with
`git worktree add` or `git archive`; none given: this tree. For each, nginx serves the
canned pod as in proxy_bench.py, the gateway runs under callgrind in front of it with
proxy_bench's config (every request moved by a cut-over rule), and after a 2,000-request
warm-up `h2load -c 10 -m 10` sends `--requests` with instrumentation on. User-space
instructions only: the kernel's share (socket reads and writes, ~10% of the CPU) is
not counted. Under valgrind the gateway is ~50x slower, so h2load keeps it saturated and
every read carries a full batch: the count is the saturated case's. `--tls`: clients
connect over TLS, as in proxy_bench's TLS runs (the upstream stays h2c).

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
from e2e import free_port

HERE = Path(__file__).resolve().parent.parent


def count(code: Path, root: Path, requests: int, tls: bool) -> tuple[float, int]:
    """(instructions per request, requests answered) of the gateway in `code`."""
    config = root / "gateway.yaml"
    if tls:
        config = root / "gateway-tls.yaml"
        config.write_text((root / "gateway.yaml").read_text() + "listen: {tls: {certFile: "
                          f"{root}/tls.crt, keyFile: {root}/tls.key}}}}\n")  # fmt: skip
    port, admin = free_port(), free_port()
    out = root / f"callgrind-{port}"
    log = root / f"gateway-{port}.out"
    args = [
        "valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}",
        sys.executable, "-m", "kom_gateway", "run", "--config", str(config),
        "--listen", f"127.0.0.1:{port}", "--admin", f"127.0.0.1:{admin}",
        "--log-level", "warning", "--engine", "nghttp2",
    ]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=str(code))
    with open(log, "w") as sink:
        # run from `code`: `python -m` puts the working directory first on sys.path
        gateway = subprocess.Popen(
            args, env=env, cwd=code, stdout=sink, stderr=subprocess.STDOUT
        )
    try:
        deadline = time.monotonic() + 300
        while "kom-gateway listening" not in log.read_text():
            if gateway.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"gateway under valgrind did not start:\n{log.read_text()}")
            time.sleep(0.5)
        url = f"{'https' if tls else 'http'}://127.0.0.1:{port}{pb.SMALL_PATH}"
        pb.h2load(url, 2000, 10, 10)
        control = ["callgrind_control", "-i"]
        subprocess.run([*control, "on", str(gateway.pid)], check=True, capture_output=True)
        result = pb.h2load(url, requests, 10, 10)
        subprocess.run([*control, "off", str(gateway.pid)], check=True, capture_output=True)
    finally:
        gateway.terminate()
        gateway.wait(120)
    total = 0
    for line in out.read_text().splitlines():
        if line.startswith("totals:"):
            total = int(line.split()[1])
    return total / requests, int(result["succeeded"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("code", nargs="*", type=Path, help="source trees (default: this one)")
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--tls", action="store_true", help="clients connect over TLS")
    args = parser.parse_args()
    trees = [path.resolve() for path in args.code] or [HERE]
    with tempfile.TemporaryDirectory(prefix="kom-instr-") as tmp:
        root = Path(tmp)
        root.chmod(0o755)
        nginx, _ = pb.serve_canned_pod(root)
        try:
            for tree in trees:
                per_request, answered = count(tree, root, args.requests, args.tls)
                print(f"{per_request / 1000:7.1f} k instructions/request  "
                      f"({answered} of {args.requests} answered)  {tree}", flush=True)  # fmt: skip
        finally:
            nginx.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
