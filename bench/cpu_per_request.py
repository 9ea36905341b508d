"""CPU per proxied small GET of one gateway process, for quick A/B comparisons of code
versions on the same machine phase (proxy_bench.py is the full, slower picture).

    python bench/cpu_per_request.py [--runs 5] [--requests 20000] [--engine nghttp2]

nginx serves the canned pod as in proxy_bench.py; the gateway runs in front of it with
proxy_bench's config (every request moved by a cut-over rule); h2load (-c 10 -m 10)
saturates it `--runs` times. Prints req/s and the gateway's utime+stime per request for
each run, and their medians. Alternate two code versions run by run and compare medians.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import proxy_bench as pb
from e2e import free_port


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--engine", default="nghttp2", choices=["nghttp2", "h2"])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="kom-cpu-") as tmp:
        root = Path(tmp)
        root.chmod(0o755)
        nginx, _ = pb.serve_canned_pod(root)
        port, admin = free_port(), free_port()
        try:
            gateway = pb.start_gateway(
                root / "gateway.yaml", port, admin, root / "gw.out", 1, args.engine
            )
            try:
                url = f"http://127.0.0.1:{port}{pb.SMALL_PATH}"
                pb.h2load(url, 3000, 10, 10)  # warm up: connections, caches
                rates, cpus = [], []
                for _ in range(args.runs):
                    before = pb.cpu_seconds(gateway.proc.pid)
                    result = pb.h2load(url, args.requests, 10, 10)
                    cpu = (pb.cpu_seconds(gateway.proc.pid) - before) / args.requests * 1e6
                    rates.append(result["rps"])
                    cpus.append(cpu)
                    print(f"{result['rps']:9.0f} req/s  {cpu:5.1f} µs CPU/request", flush=True)
                print(f"median: {statistics.median(rates):.0f} req/s, "
                      f"{statistics.median(cpus):.1f} µs CPU/request")  # fmt: skip
            finally:
                gateway.stop()
        finally:
            nginx.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
