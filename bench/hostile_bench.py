"""What one hostile client or one restart costs everyone else, measured on real processes.

    python bench/hostile_bench.py [user-agent] [exempt-stall] [restart] [burst-rss]
                                  [--repeats 3]

- **user-agent**: the cut-over rule `userAgent: "*/* (linux/*) kubernetes/*"`; 8 steady
  HTTP/2 clients read nodes in a loop while one HTTP/1.1 request arrives with a
  User-Agent of `"x/ (linux/" x N` (10, 20, 60 KB: --ua-kb). Reported: its own time,
  and the steady clients' p50/p99/max latency while it ran (a backtracking matcher froze
  everyone: 2.2 s at 10 KB, 15.5 s at 20 KB).
- **exempt-stall**: `overload.maxInflight: 100`; an exempt client (by User-Agent here;
  `system:masters` in a cluster) opens 10 connections x 100 LISTs of a 400 KB list and
  never reads. Beside it, a normal client reads the same list 400 times, 20 at once.
  Reported: the normal client's answers (200 / 429) and p99, the exempt requests in
  flight, and the gateway's bytes held for the exempt client against its bound (the
  budget, 32 MiB by default, plus one 256 KiB upstream window per seat: 100 seats).
- **restart**: 48 HTTP/1.1 clients opening a new connection per request; the gateway
  (`--reuse-port`) gets SIGTERM and the same command starts at once, with the listening
  sockets handed over (the default) and, as the baseline in the same run, with
  `--no-handover` (a socket of its own). Reported: resets, refusals and 200s.
- **burst-rss**: the gateway's RSS idle, after a burst of hostile connections (rapid
  resets, stalled readers of a large LIST, PING floods), 10 s after it, and 75 s after
  it, once the gateway has given freed memory back (`kom_gateway/server/memtrim.py`, at most
  once a minute).

Everything on 127.0.0.1; every process is stopped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import h2.settings

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from e2e import Cluster, Process  # noqa: E402  (the tests' process helpers)
from goaway_client import GoawayClient  # noqa: E402  (a Go-like HTTP/2 client)
from harness import RawH2  # noqa: E402  (a bare HTTP/2 client)
from per_request_client import connection_per_request  # noqa: E402

# appended to the test cluster's cut-over rules: "any Kubernetes client"
HOSTILE_RULE = '  - match: {userAgent: "*/* (linux/*) kubernetes/*"}\n    percent: {pod: 50}\n'
LIST = "/api/v1/namespaces/default/configmaps"


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


async def steady_reads(port: int, stop: asyncio.Event, clients: int = 8) -> list[float]:
    """Latencies (s) of GET /api/v1/nodes from `clients` Go-like clients until `stop`."""
    latencies: list[float] = []

    async def one() -> None:
        client = GoawayClient(port)
        while not stop.is_set():
            start = time.perf_counter()
            status = await client.get("/api/v1/nodes")
            latencies.append(time.perf_counter() - start if status == 200 else float("inf"))
        await client.close()

    await asyncio.gather(*(one() for _ in range(clients)))
    return latencies


async def http1_request(port: int, user_agent: bytes, path: str = "/api/v1/nodes") -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET " + path.encode() + b" HTTP/1.1\r\nHost: gw\r\nUser-Agent: " + user_agent
                 + b"\r\nConnection: close\r\n\r\n")  # fmt: skip
    response = await reader.read()
    writer.close()
    return response.split(b"\r\n", 1)[0]


def user_agent_run(root: Path, sizes_kb: list[int]) -> list[dict]:
    cluster = Cluster(root, extra=HOSTILE_RULE)  # the last cut-over rule: all are tried
    results = []
    try:
        for size_kb in sizes_kb:
            user_agent = b"x/ (linux/" * (size_kb * 1024 // 10)

            async def scenario(ua: bytes = user_agent, size: int = size_kb) -> dict:
                stop = asyncio.Event()
                steady = asyncio.ensure_future(steady_reads(cluster.port, stop))
                await asyncio.sleep(1.0)
                start = time.perf_counter()
                status = await http1_request(cluster.port, ua)
                took = time.perf_counter() - start
                await asyncio.sleep(0.5)
                stop.set()
                latencies = await steady
                return {"user_agent_kb": size, "hostile_request_s": round(took, 4),
                        "hostile_status": status.decode(errors="replace"),
                        "others_p50_ms": round(percentile(latencies, 0.5) * 1000, 2),
                        "others_p99_ms": round(percentile(latencies, 0.99) * 1000, 2),
                        "others_max_ms": round(max(latencies) * 1000, 2),
                        "others_requests": len(latencies)}  # fmt: skip

            results.append(asyncio.run(scenario()))
    finally:
        cluster.stop()
    return results


def exempt_stall_run(root: Path) -> dict:
    budget = 32 << 20  # the default perClient.maxBufferedBytes
    cluster = Cluster(root, extra=(
        'overload: {maxInflight: 100, reservedPercent: 0, exempt: [{userAgent: "admin/*"}],'
        f" perClient: {{maxBufferedBytes: {budget}}}}}\n"
        "limits: {stalledWriteTimeoutSeconds: 60}\n"))  # fmt: skip
    try:
        body = json.dumps({"metadata": {"name": "big"}, "data": {"k": "v" * 400_000}})
        cluster.kubectl("create", "-f", "-", stdin=json.dumps(
            {"apiVersion": "v1", "kind": "ConfigMap", **json.loads(body)}))

        async def scenario() -> dict:
            stalled = []
            for _ in range(10):
                raw = await RawH2.connect(cluster.port)
                raw.conn.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 0})
                raw.flush()
                for _ in range(100):
                    raw.send(LIST, user_agent=b"admin/1.0")
                stalled.append(raw)
            await asyncio.sleep(2.0)
            metrics = await asyncio.to_thread(scrape, cluster.admin)
            client = GoawayClient(cluster.port)
            statuses: Counter = Counter()
            latencies: list[float] = []
            semaphore = asyncio.Semaphore(20)

            async def read() -> None:
                async with semaphore:
                    start = time.perf_counter()
                    statuses[str(await client.get(LIST))] += 1
                    latencies.append(time.perf_counter() - start)

            await asyncio.gather(*(read() for _ in range(400)))
            await client.close()
            for raw in stalled:
                raw.writer.close()
            return {"normal_client": dict(statuses),
                    "normal_p99_ms": round(percentile(latencies, 0.99) * 1000, 1),
                    "exempt_in_flight": sample(metrics, "kom_gateway_inflight_requests",
                                               'kind="exempt"'),
                    "short_in_flight": sample(metrics, "kom_gateway_inflight_requests",
                                              'kind="short"'),
                    "bytes_held_for_exempt_client": sample(metrics,
                                                           "kom_gateway_client_buffered_bytes_max"),
                    "budget": budget}  # fmt: skip

        return asyncio.run(scenario())
    finally:
        cluster.stop()


def scrape(admin: int) -> str:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics", timeout=5) as r:
        return r.read().decode()


def sample(text: str, name: str, labels: str = "") -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.split("{")[0].split(" ")[0] == name and labels in line)  # fmt: skip


def restart_once(root: Path, handover: bool) -> dict:
    flags = ("--reuse-port", "--drain-seconds", "3", *(() if handover else ("--no-handover",)))
    cluster = Cluster(root, gateway_args=flags)
    replacement = None
    try:
        async def scenario() -> Counter:
            nonlocal replacement
            stop = asyncio.Event()
            running = asyncio.ensure_future(connection_per_request(cluster.port, stop))
            await asyncio.sleep(1.5)
            cluster.gateway.proc.send_signal(signal.SIGTERM)
            replacement = await asyncio.to_thread(
                Process, [sys.executable, "-m", "kom_gateway", "run", "--config",
                          str(cluster.config), "--listen", f"127.0.0.1:{cluster.port}",
                          "--admin", f"127.0.0.1:{cluster.admin}", *flags],
                "kom-gateway listening", root / "replacement.log")  # fmt: skip
            await asyncio.to_thread(cluster.gateway.proc.wait, 30)
            await asyncio.sleep(1.0)
            stop.set()
            return await running

        outcomes = asyncio.run(scenario())
        failed = sum(n for k, n in outcomes.items() if k != "200")
        return {"handover": handover, "ok": outcomes.get("200", 0), "failed": failed,
                "outcomes": dict(outcomes)}  # fmt: skip
    finally:
        if replacement is not None:
            replacement.stop()
        cluster.stop()


def burst_rss_run(root: Path) -> dict:
    cluster = Cluster(root, extra="limits: {stalledWriteTimeoutSeconds: 2}\n")
    pid = cluster.gateway.proc.pid
    try:
        body = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "big"},
                "data": {"k": "v" * 500_000}}  # fmt: skip
        cluster.kubectl("create", "-f", "-", stdin=json.dumps(body))
        time.sleep(1)
        idle = rss_kib(pid)

        async def burst() -> None:
            async def rapid_reset() -> None:
                raw = await RawH2.connect(cluster.port)
                raw.rapid_reset(600)
                await raw.until_closed(20)

            async def stalled() -> None:
                raw = await RawH2.connect(cluster.port)
                raw.conn.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 0})
                for _ in range(10):
                    raw.send(LIST)
                await raw.until_closed(20)

            async def pings() -> None:
                raw = await RawH2.connect(cluster.port)
                for i in range(2000):
                    raw.conn.ping(i.to_bytes(8, "big"))
                raw.flush()
                await raw.until_closed(20)

            for _ in range(3):
                await asyncio.gather(*(f() for f in (rapid_reset, pings) for _ in range(20)),
                                     *(stalled() for _ in range(40)))

        asyncio.run(burst())
        after = rss_kib(pid)
        time.sleep(10)
        settled = rss_kib(pid)
        time.sleep(65)  # the gateway trims at most once a minute (server/memtrim.py)
        return {"idle_kib": idle, "after_burst_kib": after, "10s_later_kib": settled,
                "75s_later_kib": rss_kib(pid)}  # fmt: skip
    finally:
        cluster.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("scenarios", nargs="*",
                        default=["user-agent", "exempt-stall", "restart", "burst-rss"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--ua-kb", default="10,20,60", help="hostile User-Agent sizes (KB)")
    args = parser.parse_args()
    out: dict[str, object] = {}
    with tempfile.TemporaryDirectory(prefix="kom-hostile-") as tmp:
        root = Path(tmp)
        for name in args.scenarios:
            runs = []
            for i in range(args.repeats):
                run_root = root / f"{name}-{i}"
                run_root.mkdir()
                if name == "user-agent":
                    runs.append(user_agent_run(run_root, [int(k) for k in args.ua_kb.split(",")]))
                elif name == "exempt-stall":
                    runs.append(exempt_stall_run(run_root))
                elif name == "restart":
                    (run_root / "a").mkdir()
                    (run_root / "b").mkdir()
                    runs.append([restart_once(run_root / "a", True),
                                 restart_once(run_root / "b", False)])
                elif name == "burst-rss":
                    runs.append(burst_rss_run(run_root))
                else:
                    parser.error(f"unknown scenario {name!r}")
                print(json.dumps({name: runs[-1]}), flush=True)
            out[name] = runs
    print(json.dumps(out, indent=1))
    for pair in out.get("restart", []):  # type: ignore[attr-defined]
        handed, own = pair
        print(f"restart: handover {handed['failed']} failed of {handed['ok'] + handed['failed']};"
              f" own socket {own['failed']} failed of {own['ok'] + own['failed']}")  # fmt: skip
    for run in out.get("user-agent", []):  # type: ignore[attr-defined]
        for r in run:
            print(f"user-agent {r['user_agent_kb']} KB: its request {r['hostile_request_s']} s,"
                  f" others' p99 {r['others_p99_ms']} ms, max {r['others_max_ms']} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
