"""A real Prometheus scrapes a running gateway (`--workers 2`) while traffic goes through
it, with a fallback, a 429, a reload, an ejection, a broken response, a max-age GOAWAY
and an HTTP/2 protocol error; then every PromQL expression of the Grafana dashboard is
evaluated through Prometheus' HTTP API. Each must parse and return series: a query that
returns nothing is a bug in the query or in the metrics."""

from __future__ import annotations

import http.client
import json
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from e2e import Cluster, Process, free_port, need

pytestmark = pytest.mark.timeout(180)

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "charts" / "kom-gateway" / "dashboards" / "kom-gateway.json"
PROMETHEUS = """
global: {{scrape_interval: 1s, evaluation_interval: 1s}}
scrape_configs:
  - job_name: kom-gateway
    static_configs: [{{targets: ["127.0.0.1:{admin}"], labels: {{pod: gateway-0}}}}]
"""
EXTRA = """
goaway: {maxConnectionAgeSeconds: 2, maxConnectionAgeJitter: 0}
overload:
  maxWatches: 1
  rateLimits: [{name: tight, match: {userAgent: "ratelimited/*"}, qps: 0.001, burst: 1}]
limits: {headerReadTimeoutSeconds: 1}
"""


def query(port: int, expr: str) -> dict:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


def get(port: int, path: str, agent: str = "kubectl/v1.31.0") -> int:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers={"User-Agent": agent})
    try:
        with urllib.request.urlopen(request, timeout=10) as r:
            r.read()
            return r.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except (http.client.IncompleteRead, ConnectionError):  # a response cut short
        return -1


def test_every_dashboard_query_returns_series_from_a_real_prometheus(tmp_path):
    prometheus = need("prometheus")
    cluster = Cluster(tmp_path, extra=EXTRA, gateway_args=("--workers", "2"))
    prom_port = free_port()
    (tmp_path / "prometheus.yml").write_text(PROMETHEUS.format(admin=cluster.admin))
    prom = Process([prometheus, f"--config.file={tmp_path / 'prometheus.yml'}",
                    f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                    f"--web.listen-address=127.0.0.1:{prom_port}"],
                   None, tmp_path / "prometheus.log", wait_port=prom_port)  # fmt: skip
    try:
        port = cluster.port
        for _ in range(20):  # plain traffic, through cut-over
            assert get(port, "/api/v1/namespaces/default/pods") == 200
            assert get(port, "/api/v1/nodes") == 200
        cluster.kubectl("create", "configmap", "sent-bytes", "--from-literal=a=b")  # a body
        # a fallback: the event group answers 503 to reads, default answers instead
        cluster.control_call("PUT", "/groups/event/faults", {"status_override": 503})
        assert get(port, "/api/v1/namespaces/default/events") == 200
        cluster.control_call("PUT", "/groups/event/faults", {"status_override": 0})
        # a broken response: a LIST cut in the middle of its body
        cluster.control_call("PUT", "/groups/config/faults", {"reset_mid_body": True})
        get(port, "/api/v1/configmaps")
        cluster.control_call("PUT", "/groups/config/faults", {"reset_mid_body": False})
        # 429s: a rate limit of one request per worker process (limits are per process)
        codes = [get(port, "/api/v1/nodes", "ratelimited/1.0") for _ in range(4)]
        assert codes.count(429) >= 2, codes
        # shadow reads (curl's rule shadows its pod reads to the pod group): matches, and
        # mismatches once the pod group stops serving pods
        for _ in range(5):
            assert get(port, "/api/v1/namespaces/default/pods", "curl/8.0") == 200
        cluster.control_call("PUT", "/groups/pod/faults", {"lacks_resource": "pods"})
        for _ in range(5):
            assert get(port, "/api/v1/namespaces/default/pods", "curl/8.0") == 200
        cluster.control_call("PUT", "/groups/pod/faults", {"lacks_resource": ""})
        # an ejection: a group taken down
        cluster.control_call("POST", "/groups/pod/down")
        get(port, "/api/v1/namespaces/default/pods")
        time.sleep(1)
        cluster.control_call("POST", "/groups/pod/up")
        # an HTTP/2 protocol error: a SETTINGS frame of a wrong size
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x05\x04\x00\x00\x00\x00\x00"
                         + b"\x00" * 5)  # fmt: skip
            sock.settimeout(5)
            while sock.recv(65536):
                pass
        # a connection that never says anything: turned away at the header deadline
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.settimeout(10)
            assert sock.recv(1) == b""
        # an HTTP/2 connection older than its max age: GOAWAY while its watch runs on
        subprocess.run(["curl", "-s", "--http2-prior-knowledge", "-o", "/dev/null",
                        f"http://127.0.0.1:{port}/api/v1/pods?watch=1&timeoutSeconds=4"],
                       timeout=30)  # fmt: skip
        # a reload
        cluster.config.write_text(cluster.config.read_text().replace("maxWatches: 1", "maxWatches: 5"))
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            reloads = query(prom_port, 'kom_gateway_config_reloads_total{result="applied"}')
            goaways = query(prom_port, "kom_gateway_goaways_sent_total")
            if reloads["data"]["result"] and goaways["data"]["result"]:
                break
            for _ in range(5):
                get(port, "/api/v1/nodes")
            time.sleep(1)
        time.sleep(3)  # a few more scrapes, so every rate() has two samples in its window

        dashboard = json.loads(DASHBOARD.read_text())
        empty, failed = [], []
        for panel in dashboard["panels"]:
            for target in panel["targets"]:
                expr = target["expr"].replace("$__rate_interval", "1m")
                answer = query(prom_port, expr)
                if answer["status"] != "success":
                    failed.append((panel["title"], expr, answer))
                elif not answer["data"]["result"]:
                    empty.append((panel["title"], expr))
        assert not failed, failed
        assert not empty, f"dashboard queries that return nothing: {empty}"
    finally:
        prom.stop()
        cluster.stop()
