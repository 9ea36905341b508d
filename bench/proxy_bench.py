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
  4. a steady client's p99 alone and next to a client sending 1 MiB header blocks in a
     loop (answered 431), on both HTTP/2 engines;
  5. 10,000 concurrent idle watches held by the gateway (RSS per watch), upstream = sim.

Small GETs run over h2c and over TLS (self-signed EC certificate, ALPN h2) for direct
nginx, HAProxy and the gateway on nghttp2.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import hpack
from hpack import NeverIndexedHeaderTuple
from hyperframe.frame import (
    ContinuationFrame,
    Frame,
    HeadersFrame,
    PingFrame,
    RstStreamFrame,
    SettingsFrame,
)

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
  server {{
    listen 127.0.0.1:{tls_port} ssl http2;
    ssl_certificate {root}/tls.crt;
    ssl_certificate_key {root}/tls.key;
    default_type application/json;
    location = {small} {{ alias {root}/pod.json; }}
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
frontend fe_tls
  bind 127.0.0.1:{tls_port} ssl crt {root}/tls.pem alpn h2
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


def make_certificate(root: Path) -> None:
    """A self-signed 127.0.0.1 certificate for the TLS runs (EC: fast handshakes)."""
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-days", "2", "-subj", "/CN=127.0.0.1", "-addext",
         "subjectAltName=IP:127.0.0.1", "-keyout", str(root / "tls.key"), "-out",
         str(root / "tls.crt")],
        check=True, capture_output=True,
    )  # fmt: skip
    (root / "tls.pem").write_text((root / "tls.crt").read_text() + (root / "tls.key").read_text())


def serve_canned_pod(root: Path) -> tuple[Process, int]:
    """nginx serving the canned pod and LIST from `root` (an empty, world-readable
    directory) on a free port, and the gateway config in front of it as
    `root/gateway.yaml`: the setup of the quick A/B harnesses (`cpu_per_request.py`,
    `instructions_per_request.py`). The caller stops the process."""
    (root / "tmp").mkdir()
    write_upstream_files(root)
    make_certificate(root)  # nginx.conf also serves TLS
    up = free_port()
    (root / "nginx.conf").write_text(
        NGINX.format(root=root, port=up, tls_port=free_port(), small=SMALL_PATH, list=LIST_PATH)
    )
    (root / "gateway.yaml").write_text(GATEWAY.format(upstream=up))
    nginx = Process(["nginx", "-c", str(root / "nginx.conf"), "-p", str(root)], None,
                    root / "nginx.out", wait_port=up)  # fmt: skip
    return nginx, up


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


def header_bomber(port: int, stop: threading.Event, sent: list[int]) -> None:
    """A client sending ~1 MiB header blocks in a loop (21 fields of 52 KB: each under
    nghttp2's 64 KiB per-field limit, the whole list just over the gateway's 1 MiB), up
    to 8 at a time; every one is answered 431. Reconnects if the connection ends."""
    headers = [(":method", "GET"), (":scheme", "http"), (":authority", "gw"),
               (":path", SMALL_PATH), ("user-agent", "bomber/1.0")]  # fmt: skip
    headers += [NeverIndexedHeaderTuple(f"x-bomb-{i}", "v" * 52_000) for i in range(21)]
    block = hpack.Encoder().encode(headers, huffman=False)  # encoded once, sent many times
    while not stop.is_set():
        try:
            _bomb_connection(port, block, stop, sent)
        except OSError:  # cut off (an engine may end the connection): come back
            time.sleep(0.01)


def _bomb_connection(port: int, block: bytes, stop: threading.Event, sent: list) -> None:
    """One connection of `header_bomber`, until it ends or `stop` is set. Header blocks
    are cut at the server's SETTINGS_MAX_FRAME_SIZE, as Go's transport does."""
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + SettingsFrame(0).serialize())
        buffer = b""
        stream_id, outstanding = 1, 0
        chunks: list[bytes] = []
        while not stop.is_set():
            while chunks and outstanding < 8:
                frames = [HeadersFrame(stream_id, chunks[0], flags=["END_STREAM"])]
                frames += [ContinuationFrame(stream_id, c) for c in chunks[1:]]
                frames[-1].flags.add("END_HEADERS")
                sock.sendall(b"".join(f.serialize() for f in frames))
                stream_id += 2
                outstanding += 1
            data = sock.recv(1 << 16)
            if not data:
                return
            buffer += data
            while len(buffer) >= 9:
                frame, length = Frame.parse_frame_header(memoryview(buffer[:9]))
                if len(buffer) < 9 + length:
                    break
                frame.parse_body(memoryview(buffer[9 : 9 + length]))
                buffer = buffer[9 + length :]
                if isinstance(frame, SettingsFrame) and "ACK" not in frame.flags:
                    sock.sendall(SettingsFrame(0, flags=["ACK"]).serialize())
                    size = frame.settings.get(SettingsFrame.MAX_FRAME_SIZE, 16384)
                    chunks = [block[i : i + size] for i in range(0, len(block), size)]
                elif isinstance(frame, PingFrame) and "ACK" not in frame.flags:
                    sock.sendall(PingFrame(0, frame.opaque_data, flags=["ACK"]).serialize())
                elif "END_STREAM" in frame.flags or isinstance(frame, RstStreamFrame):
                    outstanding -= 1
                    sent[0] += 1


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
    from kom_gateway.http.h2.client import H2ClientConnection
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
    up_tls, hp_tls, gp_tls, ga_tls = free_port(), free_port(), free_port(), free_port()
    make_certificate(root)
    (root / "nginx.conf").write_text(
        NGINX.format(root=root, port=up, tls_port=up_tls, small=SMALL_PATH, list=LIST_PATH)
    )
    (root / "haproxy.cfg").write_text(
        HAPROXY.format(port=hp, tls_port=hp_tls, upstream=up, root=root)
    )
    (root / "gateway.yaml").write_text(GATEWAY.format(upstream=up))
    (root / "gateway-tls.yaml").write_text(
        GATEWAY.format(upstream=up)
        + f"listen: {{tls: {{certFile: {root}/tls.crt, keyFile: {root}/tls.key}}}}\n"
    )
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
        gateway_tls = start_gateway(
            root / "gateway-tls.yaml", gp_tls, ga_tls, root / "gw-tls.out", 1, "nghttp2"
        )
        procs.append(gateway_tls)
        targets = {"direct": up, "haproxy": hp, "kom-gateway": gp, "kom-gateway h2": h2p}
        tls_targets = {"direct tls": up_tls, "haproxy tls": hp_tls, "kom-gateway tls": gp_tls}
        cpu_of = {
            "kom-gateway": gateway.proc.pid,
            "kom-gateway h2": gateway_h2.proc.pid,
            "haproxy": procs[1].proc.pid,
            "kom-gateway tls": gateway_tls.proc.pid,
            "haproxy tls": procs[1].proc.pid,
        }
        url_of = {name: f"http://127.0.0.1:{port}{SMALL_PATH}" for name, port in targets.items()}
        url_of.update(
            {name: f"https://127.0.0.1:{port}{SMALL_PATH}" for name, port in tls_targets.items()}
        )
        if args.workers > 1:
            wp, wa = free_port(), free_port()
            procs.append(
                start_gateway(root / "gateway.yaml", wp, wa, root / "workers.out", args.workers)
            )
            targets[f"kom-gateway x{args.workers}"] = wp
        results: dict = {"small_get_rps": {}, "half_load": {}, "list_mb_s": {}}

        # 1. saturation throughput, small GET (h2c and TLS)
        for url in url_of.values():
            h2load(url, 2000, 10, 10)  # warm-up
        runs: dict[str, list] = {name: [] for name in url_of}
        cpu: dict[str, list] = {name: [] for name in cpu_of}
        for _ in range(args.repeats):
            for name, url in url_of.items():
                before_cpu = cpu_seconds(cpu_of[name]) if name in cpu_of else 0.0
                r = h2load(url, args.requests, 10, 10)
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

        # 4. a steady client's p99 next to a client sending 1 MiB header blocks in a loop
        steady_rps = 50  # per each of 10 clients
        bombs: dict[str, dict] = {}
        for name in ("kom-gateway", "kom-gateway h2"):
            url = url_of[name]
            p99 = {"alone": [], "with 1 MiB header blocks": []}
            bombs_per_s = []
            for i in range(args.repeats):
                for mode in p99:
                    stop, sent = threading.Event(), [0]
                    bomber = None
                    if mode != "alone":
                        bomber = threading.Thread(
                            target=header_bomber, args=(targets[name], stop, sent), daemon=True
                        )
                        bomber.start()
                        time.sleep(0.5)
                    started, before_sent = time.monotonic(), sent[0]
                    r = h2load(url, steady_rps * 10 * 5, 10, 1, rps=steady_rps,
                               log_file=root / f"bomb-{i}.log")  # fmt: skip
                    if bomber is not None:
                        bombs_per_s.append((sent[0] - before_sent) / (time.monotonic() - started))
                        stop.set()
                        bomber.join(10)
                    p99[mode].append(r["p99_us"])
            bombs[name] = {mode: statistics.median(v) / 1000 for mode, v in p99.items()}
            bombs[name]["header_blocks_per_s"] = round(statistics.median(bombs_per_s), 1)
        results["steady_p99_ms_next_to_header_blocks"] = bombs
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
    print(
        f"TLS small GET: gateway/haproxy = "
        f"{small['kom-gateway tls'] / small['haproxy tls']:.2f}, "
        f"gateway/direct = {small['kom-gateway tls'] / small['direct tls']:.2f}"
    )
    print(f"CPU per small GET (us): {results['cpu_us_per_request']}")
    for name, r in results["steady_p99_ms_next_to_header_blocks"].items():
        print(f"{name}: steady p99 {r} (ms)")
    print(
        f"added p50 at half load: {(half['kom-gateway'] - half['direct']) / 1000:.2f} ms "
        f"(haproxy: {(half['haproxy'] - half['direct']) / 1000:.2f} ms)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
