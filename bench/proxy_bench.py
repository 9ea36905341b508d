"""Data-plane benchmark: direct vs HAProxy vs kom-gateway, same run, same fast upstream.

    python bench/proxy_bench.py [--repeats 5] [--requests 20000]

Upstream: nginx (Debian) serving canned Kubernetes JSON over h2c, so the upstream is not
the bottleneck. Proxies: HAProxy (Debian, one thread, the same path routing as the
gateway's claims) and `kom-gateway run` (one worker, uvloop). Load: h2load. Everything on
127.0.0.1; every process is stopped at the end.

Measures, each a median over --repeats:
  1. small GET throughput (req/s) at saturation, per target;
  2. latency p50/p99 at half of the gateway's max throughput (added latency vs direct);
  3. a 50 MB LIST streamed through each target (MB/s) and the gateway's RSS growth;
  4. 10,000 concurrent idle watches held by the gateway (RSS per watch), upstream = sim.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from e2e import Process, free_port  # noqa: E402  (the tests' process helpers)

SMALL_PATH = "/api/v1/namespaces/default/pods/web-0"
LIST_PATH = "/api/v1/namespaces/default/configmaps"  # the 50 MB LIST


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (what it cost, whatever the machine's other load)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_gateway(
    config: Path, port: int, admin: int, log: Path, workers: int = 1, engine: str = "auto"
) -> Process:
    """`kom-gateway run`, one process (or `workers`), as deployed."""
    args = [
        sys.executable,
        "-m",
        "kom_gateway",
        "run",
        "--config",
        str(config),
        "--listen",
        f"127.0.0.1:{port}",
        "--admin",
        f"127.0.0.1:{admin}",
        "--log-level",
        "warning",
        "--workers",
        str(workers),
        "--engine",
        engine,
    ]
    return Process(args, "kom-gateway listening", log)


def write_upstream_files(root: Path) -> None:
    pod = {
        "kind": "Pod",
        "apiVersion": "v1",
        "metadata": {
            "name": "web-0",
            "namespace": "default",
            "resourceVersion": "1234",
            "labels": {"app": "web"},
        },
        "spec": {"containers": [{"name": "c", "image": "nginx"}]},
        "status": {"phase": "Running"},
    }
    (root / "pod.json").write_text(json.dumps(pod))
    item = {"metadata": {"name": "cm", "namespace": "default"}, "data": {"blob": "x" * 4000}}
    with open(root / "list.json", "w") as f:  # ~50 MB ConfigMapList
        f.write(
            '{"kind":"ConfigMapList","apiVersion":"v1","metadata":{"resourceVersion":"1"},"items":['
        )
        n = 50 * 1024 * 1024 // (len(json.dumps(item)) + 1)
        f.write(",".join(json.dumps(item) for _ in range(n)))
        f.write("]}")


NGINX = """
worker_processes 1;
daemon off;
error_log {root}/nginx-error.log warn;
pid {root}/nginx.pid;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {root}/tmp; proxy_temp_path {root}/tmp; fastcgi_temp_path {root}/tmp;
  uwsgi_temp_path {root}/tmp; scgi_temp_path {root}/tmp;
  http2_max_concurrent_streams 1000;
  http2_max_requests 100000000;  # no periodic GOAWAY: keep the upstream neutral
  http2_chunk_size 16k;  # Go's default DATA frame size
  keepalive_requests 100000000;
  server {{
    listen 127.0.0.1:{port} http2;
    default_type application/json;
    location = {small} {{ alias {root}/pod.json; }}
    location = {list} {{ alias {root}/list.json; }}
    location = /readyz {{ return 200 "ok"; }}
  }}
}}
"""

HAPROXY = """
global
  nbthread 1
  maxconn 5000
defaults
  mode http
  timeout connect 5s
  timeout client 60s
  timeout server 60s
frontend fe
  bind 127.0.0.1:{port} proto h2
  acl is_pod path_reg ^/api/v1/(namespaces/[^/]+/)?pods
  acl is_cm path_reg ^/api/v1/(namespaces/[^/]+/)?configmaps
  use_backend pod if is_pod
  use_backend config if is_cm
  default_backend default
backend pod
  server s1 127.0.0.1:{upstream} proto h2
backend config
  server s1 127.0.0.1:{upstream} proto h2
backend default
  server s1 127.0.0.1:{upstream} proto h2
"""

GATEWAY = """
groups:
  default: {{endpoints: ["http://127.0.0.1:{upstream}"]}}
  pod:     {{endpoints: ["http://127.0.0.1:{upstream}"], resources: [pods]}}
  config:  {{endpoints: ["http://127.0.0.1:{upstream}"], resources: [configmaps]}}
cutover:
  - percent: {{pod: 100, config: 100}}
# h2load does not reconnect after a GOAWAY: no load-aware GOAWAY while it saturates us
goaway: {{maxChance: 0}}
"""


def h2load(
    url: str,
    requests: int,
    clients: int,
    streams: int,
    rps: int | None = None,
    log_file: Path | None = None,
) -> dict:
    args = ["h2load", "-n", str(requests), "-c", str(clients), "-m", str(streams), "-t", "1"]
    if rps:
        args += ["--rps", str(rps)]
    if log_file:
        args += ["--log-file", str(log_file)]
    out = subprocess.run(
        [*args, url], capture_output=True, text=True, timeout=600, check=True
    ).stdout
    m = re.search(r"finished in ([\d.]+)(m?s), ([\d.]+) req/s", out)
    done = re.search(r"(\d+) succeeded, (\d+) failed", out)
    if not m or not done:
        raise RuntimeError(out)
    result = {
        "rps": float(m.group(3)),
        "succeeded": int(done.group(1)),
        "failed": int(done.group(2)),
    }
    if log_file:
        durations = sorted(
            int(line.split()[2]) for line in log_file.read_text().splitlines() if line
        )
        result["p50_us"] = durations[len(durations) // 2]
        result["p99_us"] = durations[int(len(durations) * 0.99)]
    return result


def stream_list(url: str) -> float:
    """MB/s for one 50 MB LIST through `url` (curl, HTTP/2)."""
    out = subprocess.run(
        [
            "curl",
            "-s",
            "--http2-prior-knowledge",
            "-o",
            "/dev/null",
            "-w",
            "%{size_download} %{time_total}",
            url,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    size, seconds = out.split()
    return int(size) / 1e6 / float(seconds)


async def hold_watches(port: int, count: int, per_connection: int = 100) -> list:
    sys.path.insert(0, str(ROOT))
    from kom_gateway.http.h2client import H2ClientConnection
    from kom_gateway.http.settings import H2ClientSettings

    class Sink:
        def __init__(self) -> None:
            self.status = 0
            self.stream = None

        def on_response(self, status: int, headers: object) -> None:
            self.status = status

        def on_data(self, data: bytes, flow_len: int) -> None:
            self.stream.ack(flow_len)

        def on_end(self) -> None:
            pass

        def on_reset(self, kind: str, reason: str) -> None:
            pass

    conns, sinks = [], []
    for _ in range(count // per_connection):
        conn = await H2ClientConnection.connect(
            "127.0.0.1", port, H2ClientSettings(ping_interval=3600)
        )
        conns.append(conn)
        for _ in range(per_connection):
            sink = Sink()
            headers = [
                (b":method", b"GET"),
                (b":scheme", b"http"),
                (b":authority", b"gw"),
                (b":path", b"/api/v1/namespaces/default/pods?watch=1&timeoutSeconds=600"),
                (b"user-agent", b"bench/1"),
            ]
            sink.stream = conn.open_stream(headers, True, sink)
            sinks.append(sink)
        await asyncio.sleep(0.05)
    deadline = time.monotonic() + 120
    while sum(s.status == 200 for s in sinks) < count and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
    return [conns, sinks]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--watches", type=int, default=10000, help="0: skip the watch test")
    parser.add_argument(
        "--workers", type=int, default=0, help="also measure `run --workers N` (N > 1)"
    )
    args = parser.parse_args()
    for tool in ("nginx", "haproxy", "h2load", "curl"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} is needed: apt-get install nginx-light haproxy nghttp2-client curl")
    root = Path(tempfile.mkdtemp(prefix="kom-bench-"))
    root.chmod(0o755)  # nginx workers run unprivileged and must read the canned files
    (root / "tmp").mkdir()
    write_upstream_files(root)
    up, hp, gp, ga = free_port(), free_port(), free_port(), free_port()
    (root / "nginx.conf").write_text(
        NGINX.format(root=root, port=up, small=SMALL_PATH, list=LIST_PATH)
    )
    (root / "haproxy.cfg").write_text(HAPROXY.format(port=hp, upstream=up))
    (root / "gateway.yaml").write_text(GATEWAY.format(upstream=up))
    procs = []
    try:
        procs.append(
            Process(
                ["nginx", "-c", str(root / "nginx.conf"), "-p", str(root)],
                None,
                root / "nginx.out",
                wait_port=up,
            )
        )
        procs.append(
            Process(["haproxy", "-f", str(root / "haproxy.cfg")], None, root / "haproxy.out", hp)
        )
        gateway = start_gateway(root / "gateway.yaml", gp, ga, root / "gateway.out", 1, "nghttp2")
        procs.append(gateway)
        h2p, h2a = free_port(), free_port()
        gateway_h2 = start_gateway(root / "gateway.yaml", h2p, h2a, root / "gw-h2.out", 1, "h2")
        procs.append(gateway_h2)
        targets = {"direct": up, "haproxy": hp, "kom-gateway": gp, "kom-gateway h2": h2p}
        cpu_of = {
            "kom-gateway": gateway.proc.pid,
            "kom-gateway h2": gateway_h2.proc.pid,
            "haproxy": procs[1].proc.pid,
        }
        if args.workers > 1:
            wp, wa = free_port(), free_port()
            procs.append(
                start_gateway(root / "gateway.yaml", wp, wa, root / "workers.out", args.workers)
            )
            targets[f"kom-gateway x{args.workers}"] = wp
        results: dict = {"small_get_rps": {}, "half_load": {}, "list_mb_s": {}}

        # 1. saturation throughput, small GET
        for port in targets.values():
            h2load(f"http://127.0.0.1:{port}{SMALL_PATH}", 2000, 10, 10)  # warm-up
        runs: dict[str, list] = {name: [] for name in targets}
        cpu: dict[str, list] = {name: [] for name in cpu_of}
        for _ in range(args.repeats):
            for name, port in targets.items():
                before_cpu = cpu_seconds(cpu_of[name]) if name in cpu_of else 0.0
                r = h2load(f"http://127.0.0.1:{port}{SMALL_PATH}", args.requests, 10, 10)
                assert r["failed"] == 0, (name, r)
                runs[name].append(r["rps"])
                if name in cpu_of:
                    used = cpu_seconds(cpu_of[name]) - before_cpu
                    cpu[name].append(used / args.requests * 1e6)
        results["small_get_rps"] = {
            n: {"median": statistics.median(v), "runs": v} for n, v in runs.items()
        }
        results["cpu_us_per_request"] = {n: statistics.median(v) for n, v in cpu.items()}
        gw_max = results["small_get_rps"]["kom-gateway"]["median"]

        # 2. latency at half the gateway's max load (10 clients, rps each)
        per_client = max(1, int(gw_max / 2 / 10))
        lat: dict[str, list] = {name: [] for name in targets}
        for i in range(args.repeats):
            for name, port in targets.items():
                log = root / f"lat-{name}-{i}.log"
                r = h2load(
                    f"http://127.0.0.1:{port}{SMALL_PATH}",
                    per_client * 10 * 5,
                    10,
                    1,
                    rps=per_client,
                    log_file=log,
                )
                lat[name].append((r["p50_us"], r["p99_us"]))
        results["half_load"] = {
            n: {
                "offered_rps": per_client * 10,
                "p50_us": statistics.median(x[0] for x in v),
                "p99_us": statistics.median(x[1] for x in v),
            }
            for n, v in lat.items()
        }

        # 3. one 50 MB LIST
        before = rss_kib(gateway.proc.pid)
        mbs: dict[str, list] = {name: [] for name in targets}
        peak = before
        for _ in range(args.repeats):
            for name, port in targets.items():
                mbs[name].append(stream_list(f"http://127.0.0.1:{port}{LIST_PATH}"))
                peak = max(peak, rss_kib(gateway.proc.pid))
        results["list_mb_s"] = {n: statistics.median(v) for n, v in mbs.items()}
        results["gateway_rss_kib"] = {"before_list": before, "peak_after_lists": peak}
    finally:
        for p in reversed(procs):
            p.stop()

    if not args.watches:
        shutil.rmtree(root, ignore_errors=True)
        print(json.dumps(results, indent=2))
        return 0
    # 4. idle watches: the gateway in front of a simulated group (nginx cannot hold watches)
    sim_port, control = free_port(), free_port()
    (root / "watch.yaml").write_text(
        f'groups:\n  default: {{endpoints: ["http://127.0.0.1:{sim_port}"]}}\n'
    )
    procs = []
    try:
        procs.append(
            Process(
                [
                    sys.executable,
                    "-m",
                    "kom_gateway",
                    "sim",
                    "--config",
                    str(root / "watch.yaml"),
                    "--control-port",
                    str(control),
                    "--bookmark-interval",
                    "3600",
                ],
                "kom-gateway sim serving",
                root / "sim.out",
            )
        )
        gateway = start_gateway(root / "watch.yaml", gp, ga, root / "gateway2.out", 1, "nghttp2")
        procs.append(gateway)
        time.sleep(1)
        idle = rss_kib(gateway.proc.pid)
        loop = asyncio.new_event_loop()
        held = loop.run_until_complete(hold_watches(gp, args.watches))
        time.sleep(2)
        loaded = rss_kib(gateway.proc.pid)
        open_ok = sum(s.status == 200 for s in held[1])
        results["watches"] = {
            "requested": args.watches,
            "open": open_ok,
            "rss_idle_kib": idle,
            "rss_with_watches_kib": loaded,
            "kib_per_watch": round((loaded - idle) / max(open_ok, 1), 2),
        }
        for conn in held[0]:
            conn.close()
        loop.run_until_complete(asyncio.sleep(0.5))
        loop.close()
    finally:
        for p in reversed(procs):
            p.stop()
        shutil.rmtree(root, ignore_errors=True)

    print(json.dumps(results, indent=2))
    small = {name: r["median"] for name, r in results["small_get_rps"].items()}
    half = {name: r["p50_us"] for name, r in results["half_load"].items()}
    print(
        f"\nsmall GET: gateway/haproxy = {small['kom-gateway'] / small['haproxy']:.2f}, "
        f"gateway/direct = {small['kom-gateway'] / small['direct']:.2f}, "
        f"h2 engine/haproxy = {small['kom-gateway h2'] / small['haproxy']:.2f}"
    )
    print(f"CPU per small GET (us): {results['cpu_us_per_request']}")
    print(
        f"added p50 at half load: {(half['kom-gateway'] - half['direct']) / 1000:.2f} ms "
        f"(haproxy: {(half['haproxy'] - half['direct']) / 1000:.2f} ms)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
