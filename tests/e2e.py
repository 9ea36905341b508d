"""Real processes for end-to-end tests: `kom-gateway sim` and `kom-gateway run` on free
127.0.0.1 ports, optionally over TLS with a kubeadm-shaped PKI, always cleaned up."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from pki import PKI
from prometheus_client.parser import text_string_to_metric_families

REQUIRE = os.environ.get("KOM_REQUIRE_CLIENTS") == "1"  # CI: a missing client is a failure


def need(binary: str) -> str:
    path = shutil.which(binary)
    if path is None:
        if REQUIRE:
            pytest.fail(f"{binary} is required (KOM_REQUIRE_CLIENTS=1) but not installed")
        pytest.skip(f"{binary} not installed")
    return path


_HANDED_OUT: set[int] = set()
_LOWEST = 20000  # free_port()'s range: from here to the kernel's ephemeral range


def _ephemeral_low() -> int:
    """The lowest port the kernel gives outgoing connections (ip_local_port_range)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def free_port() -> int:
    """A port free to listen on 127.0.0.1, below the kernel's ephemeral range and never
    the same twice in one process. A port picked by binding port 0 lies in that range, so
    it is free only until the kernel hands it to an outgoing connection, and the cluster
    tests open thousands: a simulator once found its port taken that way, and a replica
    restarted in place must find its own still free."""
    low = _ephemeral_low()
    if low - _LOWEST < 1000:  # an unusual range: take the kernel's pick
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]
    for _ in range(10 * (low - _LOWEST)):
        port = random.randrange(_LOWEST, low)
        if port in _HANDED_OUT:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _HANDED_OUT.add(port)
        return port
    raise RuntimeError(f"no free port in {_LOWEST}-{low - 1}")


CONFIG = """
groups:
  default: {{endpoints: ["{scheme}://127.0.0.1:{default}"]}}
  pod:     {{endpoints: ["{scheme}://127.0.0.1:{pod}"], resources: [pods, bindings]}}
  config:  {{endpoints: ["{scheme}://127.0.0.1:{config}"], resources: [nodes, configmaps, secrets, namespaces, leases.coordination.k8s.io]}}
  event:   {{endpoints: ["{scheme}://127.0.0.1:{event}"], resources: [events, events.events.k8s.io]}}
health: {{intervalSeconds: 0.3, timeoutSeconds: 1, failureThreshold: 2}}
cutover:
  - match: {{userAgent: "kubectl/*"}}
    percent: {{pod: 100, config: 100, event: 100}}
  - match: {{userAgent: "OpenAPI-Generator/*"}}
    percent: {{pod: 100, config: 100, event: 100}}
  - match: {{userAgent: "curl/*"}}
    percent: {{config: 100}}
    shadow: {{group: pod, percent: 100, maxPerSecond: 100}}
"""

TLS_CONFIG = """
listen:
  tls: {{certFile: {pki.server_cert}, keyFile: {pki.server_key}, clientCAFile: {pki.ca}}}
upstream:
  tls: {{caFile: {pki.ca}, certFile: {pki.front_proxy_cert}, keyFile: {pki.front_proxy_key}}}
"""

KUBECONFIG = """apiVersion: v1
kind: Config
clusters:
- {{name: e2e, cluster: {{server: "{scheme}://127.0.0.1:{port}"{ca}}}}}
users:
- {{name: e2e, user: {user}}}
contexts:
- {{name: e2e, context: {{cluster: e2e, user: e2e, namespace: default}}}}
current-context: e2e
"""


def samples(text: str, name: str) -> Iterator[tuple[dict[str, str], float]]:
    """`name`'s samples on a /metrics page, each as (labels, value), read with
    prometheus-client's parser (as the rollout controller reads the gateway's)."""
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name:
                yield s.labels, s.value


def sample(text: str, name: str, **labels: str) -> float:
    """The sum of `name`'s samples on a /metrics page whose labels include `labels`."""
    return sum(
        (v for have, v in samples(text, name) if all(have.get(k) == w for k, w in labels.items())),
        0.0,
    )


def is_ready(ready: str | None, log: Path, port: int | None) -> bool:
    """A started process is ready: `ready` (a line of its output) is in its log, or,
    with none, `port` on 127.0.0.1 accepts."""
    if ready is not None:
        return ready in log.read_text()
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port or 0)) == 0


class Process:
    """A process in its own session, output to `log`, started once `ready` appears in
    its output (or, for servers that print nothing, once `wait_port` accepts)."""

    def __init__(self, args: list[str], ready: str | None, log: Path,
                 wait_port: int | None = None, cwd: Path | None = None,
                 start_timeout: float = 20) -> None:
        self.log = log
        self.handle = open(log, "w")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(args, stdout=self.handle, stderr=subprocess.STDOUT,
                                     start_new_session=True, cwd=cwd)
        deadline = time.monotonic() + start_timeout
        while not is_ready(ready, log, wait_port):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{args[:3]} did not start:\n{log.read_text()}")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.handle.close()


class Cluster:
    """Simulated groups and a gateway in front of them, as processes.

    With `pki`, everything is TLS as in a kubeadm cluster: clients verify the gateway
    against the cluster CA and may present client certificates; the gateway verifies the
    groups and presents its front-proxy certificate; the groups authenticate like
    kube-apiserver (client CA, request-header CA with allowed name front-proxy-client,
    a static token file). Without, plaintext h2c and anonymous.
    """

    def __init__(self, tmp: Path, pki: PKI | None = None, user: str = "{token: e2e-token}",
                 extra: str = "", gateway_args: tuple[str, ...] = ()) -> None:
        self.pki = pki
        self.scheme = "https" if pki else "http"
        self.ports = {g: free_port() for g in ("default", "pod", "config", "event")}
        self.control = free_port()
        self.config = tmp / "gw.yaml"
        text = CONFIG.format(scheme=self.scheme, **self.ports) + extra
        sim_flags: list[str] = []
        if pki is not None:
            text += TLS_CONFIG.format(pki=pki)
            sim_flags = ["--tls-cert-file", str(pki.server_cert), "--tls-private-key-file",
                         str(pki.server_key), "--client-ca-file", str(pki.ca),
                         "--requestheader-client-ca-file", str(pki.front_proxy_ca),
                         "--requestheader-allowed-names", "front-proxy-client",
                         "--token-auth-file", str(pki.tokens)]
        self.config.write_text(text)
        exe = [sys.executable, "-m", "kom_gateway"]
        self.sim = Process([*exe, "sim", "--config", str(self.config), "--control-port",
                            str(self.control), "--bookmark-interval", "0.5", *sim_flags],
                           "kom-gateway sim serving", tmp / "sim.log")
        try:
            self.gateway = Process([*exe, "run", "--config", str(self.config), "--listen",
                                    "127.0.0.1:0", "--admin", "127.0.0.1:0", "--drain-seconds",
                                    "1", *gateway_args],
                                   "kom-gateway listening", tmp / "gateway.log")  # fmt: skip
        except BaseException:
            self.sim.stop()  # a half-started cluster leaves nothing running
            raise
        try:
            line = next(x for x in self.gateway.log.read_text().splitlines()
                        if "kom-gateway listening" in x)  # fmt: skip
            self.port = int(line.split("listening on 127.0.0.1:")[1].split(" ")[0])
            self.admin = int(line.split("admin on 127.0.0.1:")[1].split(";")[0])
        except BaseException:
            self.stop()
            raise
        self.kubeconfig = tmp / "kubeconfig"
        self.write_kubeconfig(self.kubeconfig, user)

    def write_kubeconfig(self, path: Path, user: str) -> Path:
        """`user`: a kubeconfig user as flow YAML, e.g. {token: x} or client-certificate/-key."""
        ca = f", certificate-authority: {self.pki.ca}" if self.pki else ""
        path.write_text(KUBECONFIG.format(scheme=self.scheme, port=self.port, ca=ca, user=user))
        return path

    def control_call(self, method: str, path: str, body: object = None) -> object:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{self.control}{path}", data=data,
                                     method=method)
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.loads(r.read())

    def metrics(self) -> str:
        """The gateway's /metrics page."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.admin}/metrics", timeout=10) as r:
            return r.read().decode()

    def requests_since(self, seq: int) -> list[dict]:
        return self.control_call("GET", f"/requests?since={seq}")  # type: ignore[return-value]

    def last_seq(self) -> int:
        entries = self.requests_since(0)
        return entries[-1]["seq"] if entries else 0

    def kubectl(self, *args: str, stdin: str | None = None, check: bool = True,
                kubeconfig: Path | None = None) -> str:
        proc = subprocess.run(
            [need("kubectl"), "--kubeconfig", str(kubeconfig or self.kubeconfig), *args],
            input=stdin, capture_output=True, text=True, timeout=60, check=False)
        if check and proc.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed:\n{proc.stderr}")
        return proc.stdout

    def gateway_rss(self) -> int:
        """Resident memory of the gateway process, in bytes."""
        status = Path(f"/proc/{self.gateway.proc.pid}/status").read_text()
        return int(next(x for x in status.splitlines() if x.startswith("VmRSS:")).split()[1]) * 1024

    def stop(self) -> None:
        self.gateway.stop()
        self.sim.stop()


