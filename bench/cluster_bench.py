"""The cluster-shaped load model: N kubelets, controllers and pod churn, through the
gateway, HAProxy and directly, in one run; with faults for the SLO test.

    python bench/cluster_bench.py [--nodes 1000] [--seconds 120] [--churn 20]
        [--targets direct,haproxy,gateway,gateway-workers] [--kill-at 60] [--repeats 1]
        [--faults]

Clients: `bench/cluster/fleet.go` (Go's net/http: client-go's HTTP/2 stack, built with
the Debian `golang-go` toolchain, standard library only): every kubelet on its own TLS
connection with its own certificate (CN=system:node:<name>, O=system:nodes), doing what
a kubelet does (own-pod LIST+WATCH, lease renewals every 10 s, node status every 60 s,
events for its pods); a scheduler binding every new pod; informers over all pods and
nodes relisting every minute; a writer creating and deleting pods at --churn a second.

Upstream (`--upstream`): `sim`, the project's simulator (`kom-gateway sim`: four groups on
one store and one resourceVersion counter, with fault switches), or `go`, the Go stand-in
`bench/cluster/apiserver` (the part of kube-apiserver the fleet uses, on Go's net/http,
standard library only; four groups on one store, with the fault switches the day with
faults uses) for thousands of kubelets, where the simulator's one Python process is the
bottleneck. Either is over TLS with kube-apiserver's
authentication (x509 client certificates, the front-proxy request header), and restarted
for every target, so each starts from the same empty store.

Targets, one after another: `direct` (the fleet talks to the simulator), `haproxy`
(HAProxy 2.6, 2 threads, TLS with client certificates, the same path routing, identity
passed as X-Remote-User/Group with the front-proxy certificate), `gateway` (one process)
and `gateway-workers` (`--workers 2`). With --kill-at, the target is SIGKILLed at that
second and started again at once on the same port (a replica killed and restarted in
place: every kubelet reconnects at once). With --faults, the day with faults
(`FaultDay`: group errors, mid-body resets, a group down, a stalled client, a hostile
User-Agent, a reload, the kill) and its SLOs, checked per target (`slo_violations`;
tests/test_cluster_day.py is its short version).

Per target: watch delivery latency (binding sent -> the owning kubelet's watch event),
lease and node-status p99 (watch and lease also for what began after the start storm,
when every watch was up), failures by kind, pods never delivered, seconds until every
kubelet's watch is up after the start storm (and after the kill), the target's CPU
seconds and peak RSS, and both per 1,000 kubelets.

`--callgrind SECONDS` (target `gateway` only; needs valgrind): the gateway runs under
valgrind's callgrind, with instrumentation on for the last SECONDS of the run but five
(after the start storm), and the result gains `instructions_per_request`: the gateway's
user-space instructions in that window over the requests it finished in it (the A/B
figure for the steady state at this shape: repeat runs agree within 1.5%, where
wall-clock CPU on a shared machine moves by 2x between phases). Under valgrind the
gateway is ~50x slower: use a few hundred kubelets at most (`--nodes 200 --churn 4`),
and ignore its latencies and CPU seconds. The profile stays in the run's directory
(`--keep`) for callgrind_annotate.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from e2e import Process, free_port, sample, samples  # noqa: E402  (the tests' process helpers)
from pki import PKI, make_pki  # noqa: E402  (a kubeadm-shaped PKI, made with openssl)

FLEET_SOURCE = ROOT / "bench" / "cluster"
GROUPS = ("default", "pod", "config", "event")

GATEWAY_CONFIG = """
listen:
  address: "127.0.0.1:{port}"
  tls: {{certFile: {pki.server_cert}, keyFile: {pki.server_key}, clientCAFile: {pki.ca}}}
admin: {{address: "127.0.0.1:{admin}"}}
upstream:
  tls: {{caFile: {pki.ca}, certFile: {pki.front_proxy_cert}, keyFile: {pki.front_proxy_key}}}
groups:
  default: {{endpoints: ["https://127.0.0.1:{default}"]}}
  pod:     {{endpoints: ["https://127.0.0.1:{pod}"], resources: [pods, bindings]}}
  config:
    endpoints: ["https://127.0.0.1:{config}"]
    resources: [nodes, configmaps, secrets, namespaces, leases.coordination.k8s.io]
  event:   {{endpoints: ["https://127.0.0.1:{event}"], resources: [events, events.events.k8s.io]}}
cutover:
{rules}  - percent: {{pod: 100, config: 100, event: 100}}
{extra}"""

HAPROXY_CONFIG = """
global
  nbthread 2
  maxconn 9000
  tune.ssl.default-dh-param 2048
  # no session tickets, as the gateway's default (listen.tls.sessionTickets): no client
  # here resumes a session
  ssl-default-bind-options no-tls-tickets
defaults
  mode http
  timeout connect 5s
  timeout client 600s
  timeout server 600s
  timeout tunnel 600s
frontend fe
  bind 127.0.0.1:{port} ssl crt {root}/server.pem ca-file {pki.ca} verify required alpn h2,http/1.1
  http-request del-header X-Remote-User
  http-request del-header X-Remote-Group
  http-request del-header X-Remote-Extra-.*
  http-request set-header X-Remote-User %[ssl_c_s_dn(CN)]
  http-request set-header X-Remote-Group %[ssl_c_s_dn(O)] if {{ ssl_c_s_dn(O) -m found }}
  acl pod path_reg ^/api/v1/(namespaces/[^/]+/)?pods(/|$|\\?)
  acl cfg path_reg ^/api/v1/(namespaces/[^/]+/)?(nodes|configmaps|secrets|namespaces)(/|$|\\?)
  acl cfg path_reg ^/apis/coordination\\.k8s\\.io/v1/(namespaces/[^/]+/)?leases(/|$|\\?)
  acl evt path_reg ^/api/v1/(namespaces/[^/]+/)?events(/|$|\\?)
  acl evt path_reg ^/apis/events\\.k8s\\.io/v1/(namespaces/[^/]+/)?events(/|$|\\?)
  use_backend pod if pod
  use_backend config if cfg
  use_backend event if evt
  default_backend default
{backends}"""

BACKEND = """backend {name}
  server s1 127.0.0.1:{port} ssl verify required ca-file {pki.ca} crt {root}/front-proxy.pem alpn h2
"""


def proc_tree(pid: int) -> list[int]:
    """pid and all its descendants (a supervisor and its workers)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, ()))
    return out


def cpu_seconds(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, IndexError, ValueError):
            continue
    return total


def rss_mib(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total / 1024


def build_fleet(out: Path, package: str = ".", name: str = "fleet") -> Path:
    """`go build` the fleet, or (package ./apiserver) the Go upstream (standard library
    only: no module download)."""
    go = shutil.which("go")
    if go is None:
        sys.exit("the load model needs Go: apt-get install golang-go")
    binary = out / name
    # everything Go writes stays in `out` (no cache or GOPATH in the user's home)
    env = {**os.environ, "GOPROXY": "off", "GOCACHE": str(out / "gocache"),
           "GOPATH": str(out / "gopath"), "CGO_ENABLED": "0"}  # fmt: skip
    subprocess.run([go, "build", "-o", str(binary), package], cwd=FLEET_SOURCE, env=env,
                   check=True)  # fmt: skip
    return binary


@dataclass
class Upstream:
    """The simulator's four groups over TLS, authenticating like kube-apiserver."""

    root: Path
    pki: PKI
    ports: dict[str, int] = field(default_factory=lambda: {g: free_port() for g in GROUPS})
    control: int = field(default_factory=free_port)
    process: Process | None = None

    def start(self) -> None:
        self._start_sim()

    def _start_sim(self) -> None:
        config = self.root / "sim.yaml"
        config.write_text("groups:\n" + "".join(
            f'  {g}: {{endpoints: ["https://127.0.0.1:{p}"]}}\n' for g, p in self.ports.items()))
        pki = self.pki
        self.process = Process(
            [sys.executable, "-m", "kom_gateway", "sim", "--config", str(config),
             "--control-port", str(self.control), "--bookmark-interval", "60",
             "--tls-cert-file", str(pki.server_cert), "--tls-private-key-file", str(pki.server_key),
             "--client-ca-file", str(pki.ca), "--requestheader-client-ca-file",
             str(pki.front_proxy_ca), "--requestheader-allowed-names", "front-proxy-client"],
            "kom-gateway sim serving", self.root / "sim.log")  # fmt: skip

    def control_call(self, method: str, path: str, body: object = None) -> object:
        """The simulator's control API (faults, counters)."""
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{self.control}{path}", data=data,
                                     method=method)  # fmt: skip
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.loads(r.read())

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()


@dataclass
class GoUpstream(Upstream):
    """The Go stand-in's four groups (bench/cluster/apiserver), for loads the simulator
    cannot carry; on the simulator's control API, the fault switches the day with faults
    uses (status_override, reset_mid_body, down and up)."""

    binary: Path | None = None

    def start(self) -> None:
        pki = self.pki
        assert self.binary is not None
        self.process = Process(
            [str(self.binary), "-ports", ",".join(f"{g}={p}" for g, p in self.ports.items()),
             "-tls-cert-file", str(pki.server_cert), "-tls-private-key-file", str(pki.server_key),
             "-client-ca-file", str(pki.ca), "-requestheader-client-ca-file",
             str(pki.front_proxy_ca), "-requestheader-allowed-names", "front-proxy-client",
             "-control-port", str(self.control)],
            "apiserver stand-in serving", self.root / "apiserver.log")  # fmt: skip


class Target:
    """What the fleet talks to; `start()` returns its port, `pids()` what it costs."""

    name = ""

    def __init__(self, root: Path, upstream: Upstream, extra: str = "", rules: str = "") -> None:
        self.root = root
        self.callgrind_out: Path | None = None  # run under callgrind, profile here
        self.upstream = upstream
        self.port = free_port()
        self.admin = free_port()
        self.extra = extra  # more of the gateway's config
        self.rules = rules  # cut-over rules before the one that moves everyone
        self.config = root / f"{self.name}.yaml"
        self.process: Process | None = None

    def command(self) -> list[str]:
        raise NotImplementedError

    def ready(self) -> str | None:
        return "kom-gateway listening"

    def start(self) -> int:
        command, start_timeout = self.command(), 20.0
        if self.callgrind_out is not None:
            command = ["valgrind", "--tool=callgrind", "--instr-atstart=no",
                       f"--callgrind-out-file={self.callgrind_out}", *command]  # fmt: skip
            start_timeout = 300.0
        self.process = Process(command, self.ready(), self.root / f"{self.name}.log",
                               wait_port=self.port, start_timeout=start_timeout)  # fmt: skip
        return self.port

    def pids(self) -> list[int]:
        return proc_tree(self.process.proc.pid) if self.process is not None else []

    def kill_and_restart(self) -> None:
        """A replica SIGKILLed and started again in place (same port)."""
        assert self.process is not None
        for pid in self.pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.process.proc.wait()
        self.process.handle.close()
        log = self.root / f"{self.name}.log"  # kept: the new instance writes its own
        log.replace(log.with_suffix(".before-kill.log"))
        self.start()

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()


class Direct(Target):
    name = "direct"

    def start(self) -> int:
        return self.upstream.ports["default"]

    def pids(self) -> list[int]:
        assert self.upstream.process is not None
        return []  # the upstream itself: nothing between

    def kill_and_restart(self) -> None:
        pass


class Gateway(Target):
    name = "gateway"
    workers = 1

    def command(self) -> list[str]:
        self.config.write_text(GATEWAY_CONFIG.format(
            pki=self.upstream.pki, port=self.port, admin=self.admin, extra=self.extra,
            rules=self.rules, **self.upstream.ports))  # fmt: skip
        return [sys.executable, "-m", "kom_gateway", "run", "--config", str(self.config),
                "--log-level", "warning", "--reuse-port", "--workers", str(self.workers)]


class GatewayWorkers(Gateway):
    name = "gateway-workers"
    workers = 2


class HAProxy(Target):
    name = "haproxy"

    def ready(self) -> str | None:
        return None

    def command(self) -> list[str]:
        pki = self.upstream.pki
        (self.root / "server.pem").write_text(
            pki.server_cert.read_text() + pki.server_key.read_text())
        (self.root / "front-proxy.pem").write_text(
            pki.front_proxy_cert.read_text() + pki.front_proxy_key.read_text())
        backends = "".join(BACKEND.format(name=g, port=p, pki=pki, root=self.root)
                           for g, p in self.upstream.ports.items())  # fmt: skip
        cfg = self.root / "haproxy.cfg"
        cfg.write_text(HAPROXY_CONFIG.format(port=self.port, root=self.root, pki=pki,
                                             backends=backends))  # fmt: skip
        return ["haproxy", "-f", str(cfg)]


TARGETS = {t.name: t for t in (Direct, HAProxy, Gateway, GatewayWorkers)}


Fault = tuple[float, Callable[[], object]]


def run_fleet(
    fleet: Path,
    pki: PKI,
    port: int,
    args: argparse.Namespace,
    log: Path,
    faults: list[Fault] | None = None,
) -> tuple[dict, list[dict]]:
    """Run the fleet against 127.0.0.1:port; `faults`: (second, callable) to run then.
    Returns its summary and its progress lines (and failure lines)."""
    cmd = [str(fleet), "-target", f"https://127.0.0.1:{port}", "-ca", str(pki.ca),
           "-ca-key", str(pki.dir / "ca.key"), "-nodes", str(args.nodes),
           "-duration", f"{args.seconds}s", "-churn", str(args.churn),
           "-lease-interval", f"{args.lease_interval}s", "-status-interval",
           f"{args.status_interval}s", "-relist", f"{args.relist}s",
           "-live", str(args.live), "-informers", str(args.informers)]  # fmt: skip
    progress: list[dict] = []
    with open(log, "w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        began = time.monotonic()

        def read_progress() -> None:
            assert proc.stderr is not None
            for line in proc.stderr:
                err.write(line)
                if line.startswith("{"):
                    progress.append(json.loads(line))

        reader = threading.Thread(target=read_progress, daemon=True)
        reader.start()
        for at, action in sorted(faults or [], key=lambda f: f[0]):
            delay = at - (time.monotonic() - began)
            if delay > 0:
                time.sleep(delay)
            try:
                action()
            except Exception as exc:  # a fault that could not be made: said, the day goes on
                print(f"fault at {at} s failed: {exc!r}", file=sys.stderr)
        out, _ = proc.communicate(timeout=args.seconds + 120)
        reader.join(5)
    return json.loads(out), progress


def seconds_until_all_up(progress: list[dict], since: float, nodes: int) -> float | None:
    """From `since` (fleet seconds: a kill, which drops every watch) until every
    kubelet's watch was up again. The fleet samples once a second on a clock that
    starts a little after ours, so a dip sampled up to a second before `since` is this
    one; if no sample caught the dip, the watches were back by the first after it."""
    dipped = False
    for line in progress:
        if "watches_up" not in line or line["t"] < since - 1:
            continue
        if line["watches_up"] < nodes:
            dipped = True
        elif dipped or line["t"] >= since:
            return round(max(line["t"] - since, 0.0), 1)
    return None


def gateway_metrics(admin: int) -> str:
    """The gateway's /metrics page (with --workers, the supervisor's: all workers')."""
    with urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics", timeout=30) as r:
        return r.read().decode()


def finished_requests(admin: int) -> float:
    """kom_gateway_requests_total over every label: the requests the gateway finished."""
    return sample(gateway_metrics(admin), "kom_gateway_requests_total")


def counts_by(text: str, name: str, label: str) -> dict[str, int]:
    """`name`'s samples on a /metrics page, summed by the value of `label` (none: 0)."""
    counts: dict[str, int] = {}
    for labels, value in samples(text, name):
        if label in labels:
            counts[labels[label]] = counts.get(labels[label], 0) + int(value)
    return {key: n for key, n in counts.items() if n}


GAVE_UP = {"tls-handshake-abandoned", "tls-client-gone"}  # handshakes the client left


def failed_handshakes(text: str) -> dict[str, int]:
    """The TLS handshakes the gateway itself saw fail, by reason (`tls-handshake`,
    `tls-handshake-timeout`, `tls-handshake-abandoned`, and `tls-client-gone`: skipped,
    the client gone before its handshake began); the fleet counts what its clients
    saw."""
    rejected = counts_by(text, "kom_gateway_client_connections_rejected_total", "reason")
    return {k: n for k, n in rejected.items() if k.startswith("tls-")}


def shed_requests(text: str) -> dict[str, int]:
    """The requests the gateway itself answered 429, by reason (`client-inflight`,
    `inflight`, ...): which of its limits the fleet's 429s came from."""
    return counts_by(text, "kom_gateway_shed_requests_total", "reason")


def callgrind_window(target: Target, at: float, seconds: float, window: dict[str, float]
                     ) -> list[Fault]:  # fmt: skip
    """Faults that switch callgrind's instrumentation on at `at` and off `seconds` later
    (then dump), recording the requests finished in between in `window`."""
    def control(*argv: str) -> None:
        assert target.process is not None
        subprocess.run(["callgrind_control", *argv, str(target.process.proc.pid)],
                       check=True, capture_output=True)  # fmt: skip

    def on() -> None:
        window["before"] = finished_requests(target.admin)
        control("-i", "on")

    def off() -> None:
        control("-i", "off")
        window["requests"] = finished_requests(target.admin) - window["before"]
        control("-d")

    return [(at, on), (at + seconds, off)]


# -- the day with faults (--faults; tests/test_cluster_day.py runs its short version) -----
THRESHOLD = 3  # health.consecutiveFailures of the day's gateway
BASE_EJECTION, MAX_EJECTION = 2.0, 10.0  # its ejection times: doubled per repeat, capped
DAY_EXTRA = f"""health: {{intervalSeconds: 0.5, timeoutSeconds: 1, failureThreshold: 2,
          consecutiveFailures: {THRESHOLD}, baseEjectionSeconds: {BASE_EJECTION:g},
          maxEjectionSeconds: {MAX_EJECTION:g}}}
limits: {{stalledWriteTimeoutSeconds: 5}}
"""
HOSTILE_RULE = '  - match: {userAgent: "*/* (linux/*) kubernetes/*"}\n    percent: {pod: 100}\n'
READS = ("list", "watch", "lease-get", "check")  # kinds of the fleet's failures that are reads
WRITERS = 2  # the fleet's clients writing to the pod group at once: the writer, the scheduler
RECOVERY = 15.0  # s after the kill in which transport errors are the kill's
MAX_WATCHES_BACK = 20.0  # s: every watch back after the kill within this (an SLO)
MAX_LEASE_GAP = 40.0  # s unrenewed: the node would go NotReady


@dataclass(frozen=True)
class FaultDay:
    """When each fault happens in a run of `seconds`: the test's 60-second day,
    stretched to the run. One after another: the pod group answers 500, then resets
    every response mid-body; the event group goes down and comes back; a client stalls
    with unread LISTs; a 20 KB hostile User-Agent; a config reload; the replica is
    SIGKILLed and restarted in place (every kubelet reconnects at once)."""

    seconds: float

    def at(self, second: float) -> float:
        return round(second * self.seconds / 60, 1)

    @property
    def errors(self) -> tuple[float, float]:
        return self.at(8), self.at(13)

    @property
    def resets(self) -> tuple[float, float]:
        return self.at(16), self.at(21)

    @property
    def down(self) -> tuple[float, float]:
        return self.at(24), self.at(28)

    @property
    def kill(self) -> float:
        return self.at(40)


def stalled_client(port: int, ca: Path) -> None:
    """Ten LISTs it never reads (window 0): cut off by the stalled-reader timeout."""
    import asyncio

    import h2.settings
    from harness import RawH2

    async def stall() -> None:
        context = ssl.create_default_context(cafile=str(ca))
        context.set_alpn_protocols(["h2"])
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context)
        raw = RawH2(reader, writer)
        raw.conn.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 0})
        for _ in range(10):
            raw.send("/api/v1/pods", user_agent=b"stalled/1.0")
        await raw.until_closed(20)

    asyncio.run(asyncio.wait_for(stall(), 30))


def hostile_user_agent(port: int, ca: Path) -> str:
    """A 20 KB User-Agent of the shape the day's cut-over rule matches: the status line
    of the answer."""
    with (
        socket.create_connection(("127.0.0.1", port), timeout=30) as raw,
        ssl.create_default_context(cafile=str(ca)).wrap_socket(
            raw, server_hostname="127.0.0.1") as tls,
    ):  # fmt: skip
        answer = b""
        with contextlib.suppress(OSError):  # a server may answer and close mid-request
            tls.sendall(b"GET /api/v1/nodes HTTP/1.1\r\nHost: gw\r\nUser-Agent: "
                        + b"x/ (linux/" * 2000 + b"\r\nConnection: close\r\n\r\n")  # fmt: skip
        with contextlib.suppress(OSError):
            while chunk := tls.recv(65536):
                answer += chunk
    return answer.split(b"\r\n", 1)[0].decode(errors="replace") or "(closed, no answer)"


def fault_timeline(day: FaultDay, target: Target, pki: PKI, seen: dict) -> list[Fault]:
    """The day's faults but the kill (measure() runs that); what they saw goes in `seen`."""
    upstream = target.upstream

    def faults(group: str, **values: object) -> Callable[[], object]:
        return lambda: upstream.control_call("PUT", f"/groups/{group}/faults", values)

    def reload() -> None:  # an edit the gateway applies (SIGHUP: now, not at its next look)
        if isinstance(target, Gateway) and target.process is not None:
            target.config.write_text(target.config.read_text().replace(
                "intervalSeconds: 0.5", "intervalSeconds: 0.4"))  # fmt: skip
            os.kill(target.process.proc.pid, signal.SIGHUP)

    def stall() -> None:
        def run() -> None:
            try:
                stalled_client(target.port, pki.ca)
                seen["stalled_client"] = "cut off"
            except Exception as exc:  # e.g. closed under its writes: said, not raised
                seen["stalled_client"] = f"{exc!r}"

        threading.Thread(target=run, daemon=True).start()

    def hostile() -> None:
        seen["hostile_user_agent"] = hostile_user_agent(target.port, pki.ca)

    (e0, e1), (r0, r1), (d0, d1) = day.errors, day.resets, day.down
    timeline: list[Fault] = [
        (e0, faults("pod", status_override=500)),
        (e1, faults("pod", status_override=0)),
        (r0, faults("pod", reset_mid_body=True)),
        (r1, faults("pod", reset_mid_body=False)),
        (d0, lambda: upstream.control_call("POST", "/groups/event/down")),
        (d1, lambda: upstream.control_call("POST", "/groups/event/up")),
        (day.at(30), stall),
        (day.at(32), hostile),
        (day.at(35), reload),
    ]
    if isinstance(target, Gateway):
        def count_handshakes() -> None:
            metrics = gateway_metrics(target.admin)
            seen["handshakes_before_kill"] = failed_handshakes(metrics)
            seen["shed_before_kill"] = shed_requests(metrics)

        timeline.append((day.kill - 1, count_handshakes))
    return timeline


def ejection_rounds(seconds: float) -> int:
    """How often an endpoint failing for `seconds` is ejected (each time after
    THRESHOLD failures, out for BASE_EJECTION doubled per repeat, capped)."""
    rounds, t, out = 0, 0.0, BASE_EJECTION
    while t < seconds:
        rounds += 1
        t += out
        out = min(out * 2, MAX_EJECTION)
    return rounds


def slo_violations(day: FaultDay, summary: dict, lines: list[dict], seen: dict, readers: int,
                   back: float | None, processes: int = 1) -> list[str]:  # fmt: skip
    """The day's SLOs, each broken one in words (none: all met); `readers`: the
    fleet's clients that read the failing group at once in its reset window (the
    informers, relisting together); `processes`: the gateway's (`--workers`), each of
    which ejects a failing group on its own failures:

    - no read fails, except those cut mid-body (their headers and part of their body
      had reached the client: no one can replay those) before the group is ejected:
      THRESHOLD, and the other readers' requests already under way when it was;
      writes fail only retriably (429/503 with Retry-After, which client-go
      retries), except the apiserver's own 500s to THRESHOLD writes per ejection and
      the other writers' writes under way then (a write is never replayed);
    - transport errors only while the replica is down;
    - no well-behaved client gets a 429;
    - every pod reaches its kubelet; no lease goes MAX_LEASE_GAP unrenewed; every watch
      is back within MAX_WATCHES_BACK of the kill; informers end consistent;
    - the gateway refuses no TLS handshake and lets none time out (by its own count).

    What gets through before an ejection (THRESHOLD) is per process.
    """
    failures = [(line["t"], line["failure"]) for line in lines if "failure" in line]

    def transport(what: str) -> bool:
        return not what.rsplit(" ", 1)[-1].isdigit()

    def is_read(what: str) -> bool:
        return any(word in what for word in READS)

    broken: list[str] = []
    # (windows open a second early: the fleet's clock starts a little after ours)
    outside_kill = [(t, w) for t, w in failures if not day.kill - 1 <= t <= day.kill + RECOVERY]
    r0, r1 = day.resets
    mid_body = [(t, w) for t, w in outside_kill
                if transport(w) and r0 - 1 <= t <= r1 + 1 and is_read(w)]  # fmt: skip
    stray = [f for f in outside_kill if transport(f[1]) and f not in mid_body]
    if stray:
        broken.append(f"{len(stray)} transport errors outside the kill: {stray[:5]}")
    if len(mid_body) > (cut_most := (THRESHOLD + readers - 1) * processes):
        broken.append(f"{len(mid_body)} reads cut mid-body (at most {cut_most}): "
                      f"{mid_body[:5]}")  # fmt: skip
    statuses = [(t, w) for t, w in failures if not transport(w)]
    if failed_reads := [f for f in statuses if is_read(f[1])]:
        broken.append(f"{len(failed_reads)} reads failed with a status: {failed_reads[:5]}")
    e0, e1 = day.errors
    apiserver_500s = [f for f in statuses if f[1].endswith(" 500") and e0 - 1 <= f[0] <= e1 + 1]
    most = (THRESHOLD + WRITERS - 1) * ejection_rounds(e1 - e0) * processes
    if len(apiserver_500s) > most:
        broken.append(f"{len(apiserver_500s)} writes got the apiserver's 500 (at most {most})")
    if other := [f for f in statuses if f not in apiserver_500s and not is_read(f[1])]:
        broken.append(f"{len(other)} writes failed otherwise: {other[:5]}")
    if got_429 := [k for k in summary["retriable_writes"] if k.endswith(" 429")]:
        at = [line["t"] for line in lines if line.get("retriable", "").endswith(" 429")]
        when = f" at {min(at):.1f}-{max(at):.1f} s" if at else ""
        broken.append(f"well-behaved clients got 429{when}: {got_429}")
    if summary["pods_never_delivered"]:
        broken.append(f"{summary['pods_never_delivered']} pods never reached their kubelet")
    if summary["lease_gap_max_s"] >= MAX_LEASE_GAP:
        broken.append(f"a lease went {summary['lease_gap_max_s']} s unrenewed")
    if not summary["informers_consistent"]:
        broken.append("an informer's cache differs from a fresh LIST")
    if summary["all_watches_up_s"] <= 0:
        broken.append("the watches never all came up")
    if back is None or back >= MAX_WATCHES_BACK:
        broken.append(f"every watch back {back} s after the kill (at most {MAX_WATCHES_BACK})")
    if not seen.get("hostile_user_agent", "").startswith("HTTP/1.1 "):
        broken.append(f"the hostile User-Agent got no answer: {seen.get('hostile_user_agent')}")
    for when in ("handshakes_before_kill", "handshakes_after_kill"):
        if set(seen.get(when, {})) - GAVE_UP:  # (the fleet's own clients leaving)
            broken.append(f"TLS handshakes refused or timed out ({when}): {seen[when]}")
    return broken


def callgrind_total(out: Path | None) -> int:
    """The instructions in callgrind's dumps of `out` (the instrumented window)."""
    assert out is not None
    total = 0
    for dump in out.parent.glob(out.name + "*"):
        for line in dump.read_text().splitlines():
            if line.startswith("totals:"):  # ("summary:" is 0 in a dump on request)
                total += int(line.split()[1])
    return total


def measure(target_name: str, fleet: Path, pki: PKI, root: Path, args: argparse.Namespace,
            apiserver: Path | None = None) -> dict:  # fmt: skip
    upstream = GoUpstream(root, pki, binary=apiserver) if apiserver else Upstream(root, pki)
    upstream.start()
    day = FaultDay(args.seconds) if args.faults else None
    target = TARGETS[target_name](root, upstream, *((DAY_EXTRA, HOSTILE_RULE) if day else ()))
    if args.callgrind:
        target.callgrind_out = root / "callgrind.out"
    try:
        port = target.start()
        pids = target.pids()
        cpu0 = cpu_seconds(pids)
        peak = [rss_mib(pids)]
        cpu_at: list[tuple[float, float]] = []  # (monotonic time, the target's CPU s)
        stop = threading.Event()

        def sample_rss() -> None:
            while not stop.wait(0.5):
                now_pids = target.pids()
                peak.append(rss_mib(now_pids))
                cpu_at.append((time.monotonic(), cpu_seconds(now_pids)))

        threading.Thread(target=sample_rss, daemon=True).start()
        faults: list[Fault] = []
        killed: dict[str, float] = {}
        seen: dict = {}
        kill_at = day.kill if day else args.kill_at
        if day:
            faults += fault_timeline(day, target, pki, seen)
        if kill_at and target_name != "direct":
            def kill() -> None:
                killed["cpu_before"] = cpu_seconds(target.pids())
                killed["at"] = time.monotonic()
                target.kill_and_restart()

            faults.append((kill_at, kill))
        window: dict[str, float] = {}
        if args.callgrind:
            faults += callgrind_window(target, args.seconds - 5 - args.callgrind,
                                       args.callgrind, window)  # fmt: skip
        began = time.monotonic()
        log = root / f"fleet-{target_name}.log"
        summary, progress = run_fleet(fleet, pki, port, args, log, faults)
        stop.set()
        # the CPU is read before this bench's own /metrics read (HAProxy gets none)
        cpu_at_end = cpu_seconds(target.pids())
        cpu = cpu_at_end - (cpu0 if not killed else 0)
        metrics = gateway_metrics(target.admin) if isinstance(target, Gateway) else None
        scrape_cpu = cpu_seconds(target.pids()) - cpu_at_end
        handshakes = None if metrics is None else failed_handshakes(metrics)
        if killed:
            cpu += killed["cpu_before"] - cpu0
        result = {
            "target": target_name,
            "upstream": args.upstream,
            "cpu_seconds": round(cpu, 2),
            "cpu_seconds_per_1000_kubelets": round(cpu * 1000 / args.nodes, 2),
            "cpu_share_of_a_core": round(cpu / args.seconds, 3),
            "peak_rss_mib": round(max(peak), 1),
            "peak_rss_mib_per_1000_kubelets": round(max(peak) * 1000 / args.nodes, 1),
            **summary,
        }
        if metrics is not None:  # (after a kill: the restarted process's)
            result["gateway_failed_handshakes"] = handshakes
            result["gateway_metrics_read_cpu_seconds"] = round(scrape_cpu, 3)
            result["gateway_shed_requests"] = shed_requests(metrics)
        if window:
            result["instructions_per_request"] = round(
                callgrind_total(target.callgrind_out) / max(window["requests"], 1))
            result["callgrind_requests"] = int(window["requests"])
        if killed:
            result["all_watches_up_after_kill_s"] = seconds_until_all_up(
                progress, killed["at"] - began, args.nodes)
        if day:
            if handshakes is not None:
                seen["handshakes_after_kill"] = handshakes
            result["fault_day"] = seen
            result["slo_violations"] = slo_violations(
                day, summary, progress, seen, args.informers,
                result.get("all_watches_up_after_kill_s"), getattr(target, "workers", 1))
        up = summary.get("all_watches_up_s", -1)
        if up > 0 and cpu_at and not killed and target_name != "direct":
            # the start storm (connections, handshakes, first LISTs) apart from the rest
            at_up = next((c for t, c in cpu_at if t - began >= up), cpu_at[-1][1])
            result["storm_cpu_seconds"] = round(at_up - cpu0, 2)
            steady = args.seconds - up
            result["steady_cpu_share_of_a_core"] = round((cpu - (at_up - cpu0)) / steady, 3)
        return result
    finally:
        target.stop()
        upstream.stop()


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--seconds", type=int, default=120)
    parser.add_argument("--churn", type=float, default=20.0, help="pods created per second")
    parser.add_argument("--live", type=int, default=600, help="pods kept alive")
    parser.add_argument("--lease-interval", type=float, default=10.0)
    parser.add_argument("--status-interval", type=float, default=60.0)
    parser.add_argument("--relist", type=float, default=60.0)
    parser.add_argument("--informers", type=int, default=2)
    parser.add_argument("--kill-at", type=float, default=0.0,
                        help="SIGKILL the target at this second and restart it in place")
    parser.add_argument("--targets", default="direct,haproxy,gateway,gateway-workers")
    parser.add_argument("--upstream", choices=("sim", "go"), default="sim",
                        help="the simulator, or the Go stand-in for thousands of kubelets")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--out", help="also write the results (JSON) here")
    parser.add_argument("--callgrind", type=float, default=0.0, metavar="SECONDS",
                        help="run the gateway under callgrind and count its instructions "
                        "per request over SECONDS of the steady state (target gateway)")
    parser.add_argument("--faults", action="store_true",
                        help="the day with faults (FaultDay, the kill two thirds in) and its "
                        "SLOs, checked per target (either upstream has the fault switches)")
    parser.add_argument("--keep", metavar="DIR",
                        help="work in DIR and keep it (logs of every process, the fleet's "
                        "failure lines) instead of a temporary directory")
    return parser


def main() -> int:
    args = parser().parse_args()
    if args.callgrind:
        if set(args.targets.split(",")) != {"gateway"}:
            sys.exit("--callgrind counts one gateway process: --targets gateway")
        if args.seconds - 5 - args.callgrind < 20:
            sys.exit("--callgrind needs 20 s after the start storm: raise --seconds")
        if shutil.which("callgrind_control") is None:
            sys.exit("valgrind is needed: apt-get install valgrind")
    if args.faults and "direct" in args.targets.split(","):
        sys.exit("--faults needs a target in front of the groups: no direct")
    for tool in ("openssl", "haproxy"):
        if shutil.which(tool) is None and (tool != "haproxy" or "haproxy" in args.targets):
            sys.exit(f"{tool} is needed: apt-get install {tool}")
    results = []
    with contextlib.ExitStack() as stack:
        if args.keep:
            root = Path(args.keep)
            root.mkdir(parents=True, exist_ok=True)
        else:
            root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="kom-cluster-")))
        fleet = build_fleet(root)
        apiserver = build_fleet(root, "./apiserver", "apiserver") if args.upstream == "go" else None
        pki = make_pki(root)
        for i in range(args.repeats):
            for name in args.targets.split(","):
                run_root = root / f"{name}-{i}"
                run_root.mkdir()
                result = measure(name, fleet, pki, run_root, args, apiserver)
                results.append(result)
                print(json.dumps(result), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))
    print(f"\n{'target':16} {'cpu s/1k':>9} {'rss MiB':>8} {'watch p50/p99 ms':>17} "
          f"{'lease p99':>9} {'after storm: watch/lease p99':>28} "
          f"{'status p99':>10} {'up s':>5} {'kill up s':>9} {'never':>5} failures "
          f"handshakes failed (gateway's count)")
    for r in results:
        handshakes = r.get("gateway_failed_handshakes")
        w = r["watch_delivery_ms"]
        after = (r["watch_delivery_after_storm_ms"]["p99"], r["lease_after_storm_ms"]["p99"])
        steady = f"{after[0]:.1f}/{after[1]:.1f}"
        print(f"{r['target']:16} {r['cpu_seconds_per_1000_kubelets']:9.2f} "
              f"{r['peak_rss_mib']:8.1f} {w['p50']:8.1f}/{w['p99']:<8.1f} "
              f"{r['lease_ms']['p99']:9.1f} {steady:>28} {r['status_ms']['p99']:10.1f} "
              f"{r['all_watches_up_s']:5.1f} {r.get('all_watches_up_after_kill_s') or '-':>9} "
              f"{r['pods_never_delivered']:5d} {sum(r['failures'].values()):8d} "
              f"{'-' if handshakes is None else sum(handshakes.values())}")  # fmt: skip
    for r in results:
        if shed := r.get("gateway_shed_requests"):
            print(f"{r['target']}: answered 429 by the gateway itself: {shed}")
        print(f"{r['target']}: most requests in flight at once, per controller client "
              f"(overload.perClient.maxInflight counts them): {r.get('peak_inflight')}")
    for r in results:
        if "slo_violations" in r:
            verdict = "; ".join(r["slo_violations"]) or "every SLO met"
            print(f"{r['target']}: the day with faults: {verdict}")
    for r in results:
        if "instructions_per_request" in r:
            print(f"{r['target']}: {r['instructions_per_request']:,} instructions per request "
                  f"({r['callgrind_requests']} requests under callgrind)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
