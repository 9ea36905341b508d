"""Shadow reads: what they cost a client whose reads are shadowed, and the gateway.

    python bench/shadow_bench.py [--repeats 5] [--seconds 10] [--rate 100] [--clients 1]
                                 [--pods 50]

The simulator serves default and pod (one store, `--pods` pods); the gateway has two
rules that move nobody: `shadowed/*` shadows 100% of its pod reads to pod (no budget
in the way), `plain/*` does not. h2load sends the same reads at a fixed `--rate` from
`--clients` connections as one program, then as the other, alternating, `--repeats`
times: a GET of one pod, and a LIST
of all of them. Per arm, medians over the repeats: the client's p50/p99 (from h2load's
per-request log) and the gateway's CPU (utime + stime) per request; the difference of
the two arms' CPU is the CPU of one shadowed read (compared, since every read of the
shadowed arm is). It checks that every shadow read matched, and that every client was
answered by default.

The simulator answers both groups in one process, so a shadowed read also costs it a
second answer: keep `--rate` well below what it serves (about 1,000 small GETs/s on one
core) or its queueing shows up as the client's latency. With several `--clients`, h2load
sends their requests in step, so they queue in the simulator behind each other's shadow
reads too: one client (the default) shows what the gateway adds.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

from proxy_bench import ROOT, cpu_seconds, start_gateway

sys.path.insert(0, str(ROOT / "tests"))
from e2e import Process, free_port  # the tests' process helpers

CONFIG = """
listen: {{address: "127.0.0.1:{port}"}}
admin: {{address: "127.0.0.1:{admin}"}}
groups:
  default: {{endpoints: ["http://127.0.0.1:{default}"]}}
  pod: {{endpoints: ["http://127.0.0.1:{pod}"], resources: [pods]}}
cutover:
  - match: {{userAgent: "shadowed/*"}}
    percent: {{pod: 0}}
    shadow: {{group: pod, percent: 100, maxPerSecond: 100000}}
  - match: {{userAgent: "plain/*"}}
    percent: {{pod: 0}}
"""
KEYS = ("p50_ms", "p99_ms", "gateway_cpu_us_per_request", "sim_cpu_us_per_request")
READS = {
    "get": "/api/v1/namespaces/default/pods/p0",
    "list": "/api/v1/namespaces/default/pods",
}


def create_pods(port: int, count: int) -> None:
    for i in range(count):
        pod = {
            "metadata": {"name": f"p{i}", "labels": {"app": "bench", "i": str(i)}},
            "spec": {"nodeName": "node-1", "containers": [{"name": "c", "image": "nginx"}]},
        }
        req = urllib.request.Request(
            f"http://127.0.0.1:{port}/api/v1/namespaces/default/pods",
            data=json.dumps(pod).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        urllib.request.urlopen(req, timeout=10).read()


def shadow_results(admin: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics", timeout=10) as r:
        text = r.read().decode()
    out: dict[str, float] = {}
    for m in re.finditer(r'^kom_gateway_shadow_requests_total\{(.*)\} (\S+)$', text, re.M):
        result = re.search(r'result="([^"]*)"', m.group(1))
        reason = re.search(r'reason="([^"]*)"', m.group(1))
        key = f"{result.group(1) if result else ''}:{reason.group(1) if reason else ''}"
        out[key] = out.get(key, 0.0) + float(m.group(2))
    return out


def h2load_at(
    url: str, agent: str, rate: int, seconds: float, log: Path, clients: int = 1
) -> dict:
    """h2load at `rate` req/s as program `agent`: per-request latencies and statuses."""
    log.unlink(missing_ok=True)  # h2load appends
    total = int(rate * seconds)
    args = ["h2load", "-n", str(total), "-c", str(clients), "-m", "1", "-t", "1",
            "--rps", str(rate / clients), "-H", f"user-agent: {agent}/1.0",
            "--log-file", str(log), url]  # fmt: skip
    out = subprocess.run(args, capture_output=True, text=True, timeout=600, check=True).stdout
    if "requests:" not in out:
        raise RuntimeError(out)
    rows = [line.split() for line in log.read_text().splitlines() if line]
    latencies = sorted(int(r[2]) / 1000 for r in rows if r[1] == "200")
    return {
        "requests": total,
        "ok": len(latencies),
        "p50_ms": latencies[len(latencies) // 2],
        "p99_ms": latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
    }


def run(args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory(prefix="kom-shadow-") as tmp:
        root = Path(tmp)
        ports = {k: free_port() for k in ("port", "admin", "default", "pod")}
        config = root / "gateway.yaml"
        config.write_text(CONFIG.format(**ports))
        sim = Process([sys.executable, "-m", "kom_gateway", "sim", "--config", str(config),
                       "--control-port", str(free_port()), "--bookmark-interval", "3600"],
                      "kom-gateway sim serving", root / "sim.out")  # fmt: skip
        try:
            create_pods(ports["default"], args.pods)
            gateway = start_gateway(config, ports["port"], ports["admin"], root / "gw.out")
            try:
                return measure(args, root, ports, gateway.proc.pid, sim.proc.pid)
            finally:
                gateway.stop()
        finally:
            sim.stop()


def measure(args: argparse.Namespace, root: Path, ports: dict, gateway: int, sim: int) -> dict:
    report: dict = {"rate": args.rate, "clients": args.clients, "pods": args.pods}
    for read, path in READS.items():
        url = f"http://127.0.0.1:{ports['port']}{path}"
        h2load_at(url, "plain", args.rate, 2, root / "warm.log")  # connections, caches
        h2load_at(url, "shadowed", args.rate, 2, root / "warm.log")
        arms: dict[str, list[dict]] = {"plain": [], "shadowed": []}
        for _ in range(args.repeats):
            for arm in arms:
                before, sim_before = cpu_seconds(gateway), cpu_seconds(sim)
                shadows_before = shadow_results(ports["admin"])
                log = root / f"{arm}.log"
                result = h2load_at(url, arm, args.rate, args.seconds, log, args.clients)
                cpu = cpu_seconds(gateway) - before
                result["gateway_cpu_us_per_request"] = cpu / result["requests"] * 1e6
                result["sim_cpu_us_per_request"] = (
                    (cpu_seconds(sim) - sim_before) / result["requests"] * 1e6
                )
                after = shadow_results(ports["admin"])
                result["shadow"] = {
                    k: v - shadows_before.get(k, 0.0)
                    for k, v in after.items()
                    if v != shadows_before.get(k, 0.0)
                }
                arms[arm].append(result)
        summary: dict = {}
        for arm, results in arms.items():
            summary[arm] = {
                key: round(statistics.median(r[key] for r in results), 3)
                for key in KEYS
            }
            summary[arm]["failed"] = sum(r["requests"] - r["ok"] for r in results)
            summary[arm]["shadow"] = {
                k: sum(r["shadow"].get(k, 0.0) for r in results)
                for k in sorted({k for r in results for k in r["shadow"]})
            }
        p, s = summary["plain"], summary["shadowed"]
        summary["added_p50_ms"] = round(s["p50_ms"] - p["p50_ms"], 3)
        summary["added_p99_ms"] = round(s["p99_ms"] - p["p99_ms"], 3)
        summary["cpu_us_per_shadowed_read"] = round(
            s["gateway_cpu_us_per_request"] - p["gateway_cpu_us_per_request"], 1
        )
        report[read] = summary
        print(json.dumps({read: summary}, indent=2), flush=True)
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--rate", type=int, default=100)
    parser.add_argument("--clients", type=int, default=1)
    parser.add_argument("--pods", type=int, default=50)
    args = parser.parse_args()
    report = run(args)
    bad = [
        (read, k)
        for read in READS
        for k in report[read]["shadowed"]["shadow"]
        if not k.startswith("match:")
    ]
    if bad:
        print(f"shadow reads that did not match: {bad}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
