"""Overload and rebalancing benchmark: kom-gateway in front of a saturable apiserver group.

    python bench/overload_bench.py [--repeats 3] [--seconds 15] [--only failing]

1. **Offered load at 2x capacity.** Upstream: one simulated group whose capacity is fixed
   (`capacity` concurrent requests, each `latency` long: 10 x 50 ms = 200 req/s), so
   beyond it requests queue and latency grows, as on a saturated apiserver. The gateway
   runs once with `overload.maxInflight` at twice that capacity (capacity plus one service
   time of queue) and once without a limit
   (the baseline, same run). h2load offers 1x and 2x the capacity for --seconds; for each
   we record admitted (200) and shed (429) counts, p50/p99 of the admitted requests,
   failures, and the gateway's RSS before and after.
2. **Rebalancing.** Two gateway instances share one port (SO_REUSEPORT); 40 HTTP/2
   clients (Go-like: a persistent connection each, new connection after GOAWAY) issue a
   request every 100 ms. Instance A is restarted (SIGTERM drain, then started again), so
   every client ends up on B. We then measure how long until A holds >= 40% of the
   connections again, with no GOAWAY policy, with goaway chance 0.001, and with a max
   connection age of 10 s (+/- 10%).

3. **A failing replica.** Group `pod` has two apiservers; after 3 s of steady reads one
   of them answers 500, 503, or resets every stream (reset also fails its /readyz) for
   --fault-seconds, then heals. 8 Go-like clients read pods in a loop. We record failed
   requests (anything but 200), requests answered by default instead (fallbacks), time
   from the fault to the replica's ejection, and from healing to its return.

Everything on 127.0.0.1; every process is stopped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from pathlib import Path

from proxy_bench import ROOT, rss_kib, start_gateway

sys.path.insert(0, str(ROOT / "tests"))
from e2e import Process, free_port  # the tests' process helpers
from goaway_client import GoawayClient  # the tests' Go-like client

CAPACITY = 10  # upstream requests served at once
LATENCY = 0.05  # each takes 50 ms: 200 req/s
CAPACITY_RPS = int(CAPACITY / LATENCY)
LIMIT = 2 * CAPACITY  # the gateway's maxInflight: capacity plus one service time of queue
CLIENTS = 10
PATH = "/api/v1/namespaces/default/configmaps"


def sim(root: Path, config: Path, control: int) -> Process:
    return Process(
        [sys.executable, "-m", "kom_gateway", "sim", "--config", str(config),
         "--control-port", str(control), "--bookmark-interval", "3600"],
        "kom-gateway sim serving", root / "sim.out",
    )  # fmt: skip


def set_faults(control: int, faults: dict, group: str = "default") -> None:
    req = urllib.request.Request(
        f"http://127.0.0.1:{control}/groups/{group}/faults",
        data=json.dumps(faults).encode(),
        method="PUT",
    )
    urllib.request.urlopen(req, timeout=5).read()


def offered(url: str, rps: int, seconds: float, log: Path) -> dict:
    """h2load at `rps` for `seconds`: admitted/shed counts and admitted latency."""
    total = int(rps * seconds)
    log.unlink(missing_ok=True)  # h2load appends
    args = ["h2load", "-n", str(total), "-c", str(CLIENTS), "-m", "100", "-t", "1",
            "--rps", str(rps / CLIENTS), "--log-file", str(log), url]  # fmt: skip
    out = subprocess.run(args, capture_output=True, text=True, timeout=600, check=True).stdout
    if "requests:" not in out:
        raise RuntimeError(out)
    rows = [line.split() for line in log.read_text().splitlines() if line]
    admitted = sorted(int(r[2]) for r in rows if r[1] == "200")
    shed = sum(r[1] == "429" for r in rows)
    other = Counter(r[1] for r in rows if r[1] not in ("200", "429"))
    return {
        "sent": total,
        "admitted": len(admitted),
        "shed_429": shed,
        "other_status": sum(other.values()),
        "other_statuses": dict(other),
        "no_response": total - len(rows),  # errors, resets, timeouts
        "p50_ms": admitted[len(admitted) // 2] / 1000 if admitted else None,
        "p99_ms": admitted[int(len(admitted) * 0.99)] / 1000 if admitted else None,
    }


def overload_run(root: Path, seconds: float, repeats: int) -> dict:
    sim_port, control = free_port(), free_port()
    groups = f'groups:\n  default: {{endpoints: ["http://127.0.0.1:{sim_port}"]}}\n'
    # h2load does not reconnect after a GOAWAY (the rest of that client's requests would
    # never be sent), so load-aware GOAWAY is off here; the rebalancing run measures it
    groups += "goaway: {maxChance: 0}\n"
    configs = {
        "limited": groups + f"overload: {{maxInflight: {LIMIT}, reservedPercent: 0, exempt: []}}\n",
        # (h2load is one client: with no group limit its fair share would still hold it)
        "unlimited": groups + "overload: {maxInflight: 0, perClient: {maxInflight: 0}}\n",
    }
    results: dict = {name: {"1x": [], "2x": []} for name in configs}
    (root / "sim.yaml").write_text(groups)
    upstream = sim(root, root / "sim.yaml", control)
    try:
        set_faults(control, {"latency": LATENCY, "capacity": CAPACITY})
        for repeat in range(repeats):
            for name, text in configs.items():
                config = root / f"{name}.yaml"
                config.write_text(text)
                port, admin = free_port(), free_port()
                gateway = start_gateway(config, port, admin, root / f"gw-{name}.out")
                try:
                    for factor in ("1x", "2x"):
                        rps = CAPACITY_RPS * (1 if factor == "1x" else 2)
                        before = rss_kib(gateway.proc.pid)
                        r = offered(f"http://127.0.0.1:{port}{PATH}", rps, seconds,
                                    root / "h2load.log")  # fmt: skip
                        r["rss_before_kib"], r["rss_after_kib"] = before, rss_kib(gateway.proc.pid)
                        r["alive"] = gateway.proc.poll() is None
                        results[name][factor].append(r)
                        print(f"repeat {repeat} {name} {factor}: {r}", flush=True)
                        time.sleep(2)  # let queues empty
                finally:
                    gateway.stop()
    finally:
        upstream.stop()
    return results


def connections(admin: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics", timeout=5) as r:
        text = r.read().decode()
    m = re.search(r'^kom_gateway_client_connections\{protocol="h2"\} (\S+)$', text, re.M)
    return float(m.group(1)) if m else 0.0


def reuse_port_gateway(config: Path, port: int, admin: int, log: Path) -> Process:
    return Process(
        [sys.executable, "-m", "kom_gateway", "run", "--config", str(config), "--listen",
         f"127.0.0.1:{port}", "--admin", f"127.0.0.1:{admin}", "--reuse-port",
         "--drain-seconds", "2", "--log-level", "warning"],
        "kom-gateway listening", log,
    )  # fmt: skip


async def rebalance_once(root: Path, config: Path, limit: float) -> dict:
    port, admin_a, admin_b = free_port(), free_port(), free_port()
    a = reuse_port_gateway(config, port, admin_a, root / "a.out")
    b = reuse_port_gateway(config, port, admin_b, root / "b.out")
    clients = [GoawayClient(port) for _ in range(40)]
    stop = asyncio.Event()

    async def run(client: GoawayClient) -> None:
        while not stop.is_set():
            await client.get(PATH)
            await asyncio.sleep(0.1)

    tasks = [asyncio.ensure_future(run(c)) for c in clients]
    try:
        await asyncio.sleep(2)
        a.proc.send_signal(signal.SIGTERM)
        await asyncio.to_thread(a.proc.wait, 20)
        a.stop()
        a = await asyncio.to_thread(reuse_port_gateway, config, port, admin_a, root / "a2.out")
        restarted = time.monotonic()
        share = 0.0
        elapsed = None
        while time.monotonic() - restarted < limit:
            await asyncio.sleep(0.5)
            on_a, on_b = await asyncio.to_thread(
                lambda: (connections(admin_a), connections(admin_b))
            )
            share = on_a / max(on_a + on_b, 1)
            if share >= 0.4:
                elapsed = time.monotonic() - restarted
                break
        stop.set()
        await asyncio.gather(*tasks)
        outcomes = sum((c.outcomes for c in clients), start=type(clients[0].outcomes)())
        return {"seconds_to_40pct": elapsed, "share_on_restarted": round(share, 2),
                "failed_requests": sum(n for k, n in outcomes.items() if k != 200),
                "requests": sum(outcomes.values())}  # fmt: skip
    finally:
        stop.set()
        for client in clients:
            await client.close()
        a.stop()
        b.stop()


def rebalance_run(root: Path, repeats: int, limit: float) -> dict:
    sim_port, control = free_port(), free_port()
    groups = f'groups:\n  default: {{endpoints: ["http://127.0.0.1:{sim_port}"]}}\n'
    (root / "sim.yaml").write_text(groups)
    variants = {
        "no GOAWAY policy": "",
        "goaway chance 0.001": "goaway: {chance: 0.001}\n",
        "max connection age 10 s": "goaway: {maxConnectionAgeSeconds: 10}\n",
    }
    upstream = sim(root, root / "sim.yaml", control)
    results: dict = {}
    try:
        for repeat in range(repeats):
            for name, extra in variants.items():
                config = root / "rebalance.yaml"
                config.write_text(groups + extra)
                r = asyncio.run(rebalance_once(root, config, limit))
                print(f"repeat {repeat} {name}: {r}", flush=True)
                results.setdefault(name, []).append(r)
    finally:
        upstream.stop()
    return results


FAULTS = {
    "500": {"status_override": 500},
    "503": {"status_override": 503},
    "reset": {"reset_before_headers": True},
}
HEALED = {"status_override": 0, "reset_before_headers": False}


def endpoint_healthy(admin: int, endpoint: str) -> float | None:
    with urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics", timeout=5) as r:
        text = r.read().decode()
    for line in text.splitlines():
        if line.startswith("kom_gateway_upstream_endpoint_healthy{") and (
            f'endpoint="{endpoint}"' in line
        ):
            return float(line.rsplit(" ", 1)[1])
    return None


def fallbacks(admin: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics", timeout=5) as r:
        text = r.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("kom_gateway_fallbacks_total{"))  # fmt: skip


async def failing_replica_once(root: Path, fault: str, fault_seconds: float) -> dict:
    ports = {"default": free_port(), "pod": free_port(), "pod-1": free_port()}
    control = free_port()
    config = root / "failing.yaml"
    config.write_text(
        "groups:\n"
        f'  default: {{endpoints: ["http://127.0.0.1:{ports["default"]}"]}}\n'
        f'  pod: {{endpoints: ["http://127.0.0.1:{ports["pod"]}", '
        f'"http://127.0.0.1:{ports["pod-1"]}"], resources: [pods]}}\n'
        "cutover:\n  - percent: {pod: 100}\n"
        "health: {intervalSeconds: 1, timeoutSeconds: 1, failureThreshold: 2, "
        "consecutiveFailures: 5, baseEjectionSeconds: 5, maxEjectionSeconds: 30}\n"
        "goaway: {maxChance: 0}\n"
    )
    upstream = sim(root, config, control)
    port, admin = free_port(), free_port()
    gateway = start_gateway(config, port, admin, root / f"gw-failing-{fault}.out")
    bad = f"http://127.0.0.1:{ports['pod-1']}"
    clients = [GoawayClient(port) for _ in range(8)]
    stop = asyncio.Event()

    async def run(client: GoawayClient) -> None:
        while not stop.is_set():
            await client.get("/api/v1/namespaces/default/pods")
            await asyncio.sleep(0.005)

    async def wait_health(value: float, since: float, limit: float) -> float | None:
        while time.monotonic() - since < limit:
            if await asyncio.to_thread(endpoint_healthy, admin, bad) == value:
                return round(time.monotonic() - since, 2)
            await asyncio.sleep(0.05)
        return None

    tasks = [asyncio.ensure_future(run(c)) for c in clients]
    try:
        await asyncio.sleep(3)
        moved_before = await asyncio.to_thread(fallbacks, admin)
        await asyncio.to_thread(set_faults, control, FAULTS[fault], "pod-1")
        faulted = time.monotonic()
        to_eject = await wait_health(0.0, faulted, fault_seconds)
        await asyncio.sleep(max(0.0, fault_seconds - (time.monotonic() - faulted)))
        moved = await asyncio.to_thread(fallbacks, admin) - moved_before
        await asyncio.to_thread(set_faults, control, HEALED, "pod-1")
        healed = time.monotonic()
        to_return = await wait_health(1.0, healed, 60)
        await asyncio.sleep(1)
        stop.set()
        await asyncio.gather(*tasks)
        outcomes = sum((c.outcomes for c in clients), start=type(clients[0].outcomes)())
        return {"failed_requests": sum(n for k, n in outcomes.items() if k != 200),
                "requests": sum(outcomes.values()), "fallbacks": moved,
                "seconds_to_eject": to_eject, "seconds_to_return": to_return}  # fmt: skip
    finally:
        stop.set()
        for client in clients:
            await client.close()
        gateway.stop()
        upstream.stop()


def failing_replica_run(root: Path, repeats: int, fault_seconds: float) -> dict:
    results: dict = {}
    for repeat in range(repeats):
        for fault in FAULTS:
            r = asyncio.run(failing_replica_once(root, fault, fault_seconds))
            print(f"repeat {repeat} failing replica {fault}: {r}", flush=True)
            results.setdefault(fault, []).append(r)
    return results


def median(values: list) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=15)
    parser.add_argument("--rebalance-limit", type=float, default=60)
    parser.add_argument("--fault-seconds", type=float, default=15)
    parser.add_argument(
        "--only", choices=("overload", "rebalance", "failing"), help="run one part only"
    )
    args = parser.parse_args()
    if shutil.which("h2load") is None:
        print("needs h2load (Debian nghttp2-client)", file=sys.stderr)
        return 2
    root = Path(tempfile.mkdtemp(prefix="kom-overload-bench-"))
    wanted = {args.only} if args.only else {"overload", "rebalance", "failing"}
    overload: dict = {}
    rebalance: dict = {}
    failing: dict = {}
    try:
        if "overload" in wanted:
            overload = overload_run(root, args.seconds, args.repeats)
        if "rebalance" in wanted:
            rebalance = rebalance_run(root, args.repeats, args.rebalance_limit)
        if "failing" in wanted:
            failing = failing_replica_run(root, args.repeats, args.fault_seconds)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print("\n## 2x capacity (medians)")
    for name, by_factor in overload.items():
        for factor, runs in by_factor.items():
            keys = ("admitted", "shed_429", "other_status", "no_response", "p50_ms", "p99_ms")
            summary = {k: median([r[k] for r in runs]) for k in keys}
            growth = median([(r["rss_after_kib"] - r["rss_before_kib"]) / 1024 for r in runs])
            alive = all(r["alive"] for r in runs)
            print(f"{name} {factor}: {summary}, RSS growth {growth:.1f} MiB, alive {alive}")
    print("\n## rebalancing after a restart (medians)")
    for name, runs in rebalance.items():
        print(
            f"{name}: {median([r['seconds_to_40pct'] for r in runs])} s to 40% "
            f"({sum(r['seconds_to_40pct'] is None for r in runs)}/{len(runs)} runs never "
            f"within {args.rebalance_limit:.0f} s); failed requests "
            f"{sum(r['failed_requests'] for r in runs)} of {sum(r['requests'] for r in runs)}"
        )
    print("\n## a failing replica (medians)")
    for fault, runs in failing.items():
        print(
            f"{fault}: failed {sum(r['failed_requests'] for r in runs)} of "
            f"{sum(r['requests'] for r in runs)} requests; fallbacks "
            f"{median([r['fallbacks'] for r in runs])}; ejected after "
            f"{median([r['seconds_to_eject'] for r in runs])} s; back "
            f"{median([r['seconds_to_return'] for r in runs])} s after healing"
        )
    print(json.dumps({"overload": overload, "rebalance": rebalance, "failing": failing}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
