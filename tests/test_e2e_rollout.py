"""`kom-gateway rollout run` as a process, driving a real gateway (reloading its config
file) in front of the simulator, with kubelet-like clients sending traffic throughout:

- a clean rollout through [10, 50, 100] completes, and at every step exactly the clients
  whose bucket is below the percent are answered by the pod group;
- a stopped controller resumes where it was; a second controller is refused;
- a 500 fault in the pod group mid-rollout rolls back within a guard window, with no
  request lost (fallback covers the gap) and the reason logged;
- with a ConfigMap target (the simulator's API), the edits, the state annotation and the
  Events are what kubectl shows.
"""

from __future__ import annotations

import difflib
import http.client
import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from e2e import Cluster, Process, need

from kom_gateway.config import load_config_text
from kom_gateway.kube.identity import token_identity
from kom_gateway.rollout.edit import find_rule
from kom_gateway.rollout.state import rollout_key
from kom_gateway.routing.cutover import Client

pytestmark = pytest.mark.timeout(150)

CLIENTS = 100
LABEL = "userAgent=kubelet/*"
EXTRA = "debug: {answeredByHeader: X-Kom-Group}\n"
SPEC = """
target: {target}
rule: {{userAgent: "kubelet/*"}}
group: pod
steps: {steps}
hold: {hold}
interval: 0.25s
guards:
  source: {source}
  window: 1s
  minRequests: 20
  maxErrorRatio: 0.01
  maxFallbackRatio: 0.01
  maxP99Seconds: 1
"""


def token(i: int) -> str:
    return f"kubelet-token-{i}"


def bucket(i: int) -> float:
    return Client("kubelet/v1.31.0", token_identity(token(i).encode()), "127.0.0.1").bucket


class Traffic:
    """Kubelet-like clients (one bearer token each) listing pods through the gateway,
    about 300 requests/s; every answer is kept as (time, client, status, group)."""

    def __init__(self, port: int, threads: int = 3) -> None:
        self.port = port
        self.answers: list[tuple[float, int, int, str]] = []
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._loop, args=(t, threads)) for t in range(threads)]
        for t in self.threads:
            t.start()

    def _loop(self, first: int, stride: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        i = first
        while not self.stop.is_set():
            client = i % CLIENTS
            started = time.time()
            try:
                conn.request("GET", "/api/v1/namespaces/default/pods", headers={
                    "User-Agent": "kubelet/v1.31.0 (linux/amd64) kubernetes/abc",
                    "Authorization": f"Bearer {token(client)}"})  # fmt: skip
                resp = conn.getresponse()
                resp.read()
                group = (resp.getheader("X-Kom-Group") or "").split(";")[0]
                self.answers.append((started, client, resp.status, group))
            except (OSError, http.client.HTTPException):
                self.answers.append((started, client, -1, ""))
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
            i += stride
            time.sleep(0.01)
        conn.close()

    def close(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(15)

    def moved_between(self, start: float, end: float) -> dict[int, set[str]]:
        seen: dict[int, set[str]] = {}
        for when, client, _, group in self.answers:
            if start <= when < end:
                seen.setdefault(client, set()).add(group)
        return seen


def write_spec(tmp: Path, cluster: Cluster, *, steps: str = "[10, 50, 100]", hold: str = "1.5s",
               target: str | None = None, source: str | None = None) -> Path:
    spec = tmp / "rollout.yaml"
    spec.write_text(SPEC.format(
        target=target or f"{{file: {cluster.config}}}", steps=steps, hold=hold,
        source=source or f'{{gateways: ["http://127.0.0.1:{cluster.admin}"]}}'))  # fmt: skip
    return spec


def controller(spec: Path, log: Path, *args: str) -> subprocess.Popen:
    with open(log, "w") as out:  # the child keeps its own copy of the descriptor
        return subprocess.Popen([sys.executable, "-m", "kom_gateway", "rollout", "run", str(spec), *args],
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip


def rollout_under_traffic(tmp: Path, cluster: Cluster, spec: Path) -> Traffic:
    """Run the controller to its end (exit 0) while the kubelets send traffic."""
    traffic = Traffic(cluster.port)
    try:
        proc = controller(spec, tmp / "rollout.log")
        assert proc.wait(90) == 0, (tmp / "rollout.log").read_text()
    finally:
        traffic.close()
    return traffic


def state_of(cluster: Cluster) -> dict:
    path = Path(f"{cluster.config}.rollout-{rollout_key(LABEL, 'pod')}.json")
    return json.loads(path.read_text()) if path.exists() else {}


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def history(state: dict, action: str) -> list[dict]:
    return [h for h in state.get("history", []) if h["action"] == action]


@pytest.fixture
def cluster(tmp_path):
    c = Cluster(tmp_path, extra=EXTRA, gateway_args=("--watch-interval", "0.1"))
    yield c
    c.stop()


def test_a_clean_rollout_moves_exactly_the_clients_below_each_step(tmp_path, cluster):
    before = cluster.config.read_text()
    traffic = rollout_under_traffic(tmp_path, cluster, write_spec(tmp_path, cluster))
    log = (tmp_path / "rollout.log").read_text()
    state = state_of(cluster)
    assert state["phase"] == "Succeeded" and state["percent"] == 100
    assert state["lease"] is None  # released on exit
    # the steps, in order, each served by the replica before its hold began
    assert [h["percent"] for h in history(state, "promote")] == [10, 50, 100]
    applied = history(state, "applied")
    assert [h["percent"] for h in applied] == [10, 50, 100]
    ends = [h["time"] for h in history(state, "promote")[1:]] + [history(state, "succeed")[0]["time"]]
    for step, start, end in zip((10, 50, 100), (h["time"] for h in applied), ends, strict=True):
        seen = traffic.moved_between(start, end)
        assert len(seen) == CLIENTS, f"not every client was heard at {step}%"
        want = {i for i in range(CLIENTS) if bucket(i) < step}
        assert {i for i, groups in seen.items() if groups == {"pod"}} == want, step
        assert {i for i, groups in seen.items() if groups == {"default"}} == set(range(CLIENTS)) - want
    assert all(status == 200 for _, _, status, _ in traffic.answers)
    # the only change to the config: the rule, added at the end, with its percent
    diff = [line for line in difflib.unified_diff(before.splitlines(), cluster.config.read_text().splitlines(), n=0)
            if line[:1] in "+-" and line[:3] not in ("+++", "---")]  # fmt: skip
    assert diff == ['+  - match: {userAgent: "kubelet/*"}', "+    percent: {pod: 100}"], diff
    for words in ("starting userAgent=kubelet/* -> pod", "promote: 10% -> 50%", "rollout complete"):
        assert words in log, log


def test_resume_refuse_a_second_controller_and_roll_back_on_a_fault(tmp_path, cluster):
    spec = write_spec(tmp_path, cluster, hold="3s")
    traffic = Traffic(cluster.port)
    first = second = None
    try:
        first = controller(spec, tmp_path / "first.log")
        wait_for(lambda: history(state_of(cluster), "applied"), 30, "the first step to be served")
        first.send_signal(signal.SIGTERM)
        assert first.wait(15) == 0
        assert state_of(cluster)["percent"] == 10 and state_of(cluster)["lease"] is None

        second = controller(spec, tmp_path / "second.log")
        wait_for(lambda: "resuming" in (tmp_path / "second.log").read_text(), 15, "the resume")
        third = subprocess.run([sys.executable, "-m", "kom_gateway", "rollout", "run", str(spec)],
                               capture_output=True, text=True, timeout=30)  # fmt: skip
        assert third.returncode == 1
        assert "another controller drives userAgent=kubelet/* -> pod" in third.stderr, third.stderr

        wait_for(lambda: [h for h in history(state_of(cluster), "applied") if h["percent"] == 50],
                 30, "50% to be served")  # fmt: skip
        faulted = time.time()
        cluster.control_call("PUT", "/groups/pod/faults", {"status_override": 500})
        assert second.wait(30) == 3, (tmp_path / "second.log").read_text()
    finally:
        traffic.close()
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.kill()
    state = state_of(cluster)
    assert state["phase"] == "RolledBack" and state["percent"] == 10
    rollback = history(state, "rollback")[0]
    assert rollback["time"] - faulted < 1 + 2.5  # one window, and a reading or two
    assert "fallback ratio" in rollback["message"]
    log = (tmp_path / "second.log").read_text()
    assert "resuming userAgent=kubelet/* -> pod" in log and "rolling back to 10%" in log
    assert "percent: {pod: 10}" in cluster.config.read_text()
    # no request was lost: reads the group failed were answered by default
    assert [a for a in traffic.answers if a[2] != 200] == []
    assert any(a[3] == "default" and a[0] > faulted and bucket(a[1]) < 50 for a in traffic.answers)
    # a rolled-back rollout does not restart by itself
    again = subprocess.run([sys.executable, "-m", "kom_gateway", "rollout", "run", str(spec)],
                           capture_output=True, text=True, timeout=30)  # fmt: skip
    assert again.returncode == 1 and "--resume" in again.stderr
    status = subprocess.run([sys.executable, "-m", "kom_gateway", "rollout", "status", str(spec)],
                            capture_output=True, text=True, timeout=30, check=True)  # fmt: skip
    assert "phase: RolledBack" in status.stdout and "percent: 10%" in status.stdout


def test_configmap_target_edits_and_events_are_visible_with_kubectl(tmp_path, cluster):
    need("kubectl")
    cluster.kubectl("create", "configmap", "kom-gateway", "-n", "kube-system",
                    f"--from-file=config.yaml={cluster.config}")  # fmt: skip

    def kubelet_sync(stop: threading.Event) -> None:
        """What kubelet does for a ConfigMap volume: the gateway's file follows the key."""
        while not stop.wait(0.2):
            out = cluster.kubectl("get", "configmap", "kom-gateway", "-n", "kube-system", "-o",
                                  "jsonpath={.data.config\\.yaml}", check=False)  # fmt: skip
            if out and out != cluster.config.read_text():
                cluster.config.write_text(out)

    stop = threading.Event()
    sync = threading.Thread(target=kubelet_sync, args=(stop,))
    sync.start()
    spec = write_spec(tmp_path, cluster, steps="[50, 100]", hold="1s",
                      target=f"{{configMap: {{namespace: kube-system, name: kom-gateway}}, "
                             f"kubeconfig: {cluster.kubeconfig}}}")  # fmt: skip
    try:
        rollout_under_traffic(tmp_path, cluster, spec)
    finally:
        stop.set()
        sync.join()
    cm = yaml.safe_load(cluster.kubectl("get", "configmap", "kom-gateway", "-n", "kube-system", "-o", "yaml"))
    assert "percent: {pod: 100}" in cm["data"]["config.yaml"]
    state = json.loads(cm["metadata"]["annotations"][f"rollout.kom-gateway.io/{rollout_key(LABEL, 'pod')}"])
    assert state["phase"] == "Succeeded"
    events = cluster.kubectl("get", "events", "-n", "kube-system", "-o", "json")
    reasons = [(e["reason"], e["involvedObject"]["name"], e["source"]["component"])
               for e in json.loads(events)["items"]]  # fmt: skip
    for reason in ("RolloutStarted", "RolloutPromoted", "RolloutStepServed", "RolloutSucceeded"):
        assert (reason, "kom-gateway", "kom-gateway-rollout") in reasons, reasons
    table = cluster.kubectl("get", "events", "-n", "kube-system")
    assert "RolloutSucceeded" in table and "rollout complete" in table
    status = subprocess.run([sys.executable, "-m", "kom_gateway", "rollout", "status", str(spec), "--json"],
                            capture_output=True, text=True, timeout=30, check=True)  # fmt: skip
    assert json.loads(status.stdout)["phase"] == "Succeeded"


def test_prometheus_as_the_guard_source(tmp_path, cluster):
    """The same guards, read through PromQL from a real Prometheus scraping the gateway."""
    prometheus = need("prometheus")
    from test_e2e_prometheus import PROMETHEUS, free_port

    port = free_port()
    (tmp_path / "prometheus.yml").write_text(PROMETHEUS.format(admin=cluster.admin))
    prom = Process([prometheus, f"--config.file={tmp_path / 'prometheus.yml'}",
                    f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address=127.0.0.1:{port}"],
                   None, tmp_path / "prometheus.log", wait_port=port)  # fmt: skip
    try:
        spec = write_spec(tmp_path, cluster, steps="[50, 100]", hold="3s",
                          source=f"{{prometheus: {{url: 'http://127.0.0.1:{port}'}}}}")  # fmt: skip
        spec.write_text(spec.read_text().replace("window: 1s", "window: 3s").replace("interval: 0.25s", "interval: 0.5s")
                        + "shadow: {percent: 100, hold: 3s, maxPerSecond: 1000}\n")  # fmt: skip
        rollout_under_traffic(tmp_path, cluster, spec)
    finally:
        prom.stop()
    state = state_of(cluster)
    assert state["phase"] == "Succeeded"
    promoted = history(state, "promote")
    assert [h["percent"] for h in promoted] == [50, 100]
    assert "requests in" in promoted[-1]["message"]  # the readings that justified it
    # the shadow phase before them, judged on PromQL's counts of compared reads
    passed = history(state, "shadow-pass")[0]
    assert passed["time"] < promoted[0]["time"] and " 0 mismatches" in passed["message"]
    assert int(passed["message"].split("passed after ")[1].split(": ")[1].split()[0]) > 20


def test_a_shadow_phase_stops_a_diverging_group_before_anyone_moves_then_passes(tmp_path, cluster):
    """The spec's shadow phase: reads compared before any client moves; a group that
    answers differently ends the rollout with nobody moved; fixed, the phase passes and
    the steps run."""
    spec = write_spec(tmp_path, cluster, steps="[100]", hold="1s")
    spec.write_text(spec.read_text() + "shadow: {percent: 100, hold: 1s, maxPerSecond: 1000, "
                    "maxMismatchRatio: 0.01}\n")  # fmt: skip
    before = cluster.config.read_text()
    conn = http.client.HTTPConnection("127.0.0.1", cluster.port, timeout=10)
    for i in range(3):  # (an empty list reads the same however a group diverges)
        conn.request("POST", "/api/v1/namespaces/default/pods", json.dumps(
            {"metadata": {"name": f"p{i}"}, "spec": {"containers": [{"name": "c", "image": "x"}]}}),
            {"Content-Type": "application/json"})  # fmt: skip
        assert conn.getresponse().read() and True
    conn.close()
    cluster.control_call("PUT", "/groups/pod/faults", {"diverge": "content"})
    traffic = Traffic(cluster.port)
    try:
        proc = controller(spec, tmp_path / "diverging.log")
        assert proc.wait(60) == 3, (tmp_path / "diverging.log").read_text()
    finally:
        traffic.close()
    state = state_of(cluster)
    assert state["phase"] == "RolledBack" and state["shadow"] == "failed" and state["percent"] == 0
    assert "shadow phase failed: mismatch ratio" in state["reason"]
    assert {group for _, _, _, group in traffic.answers} == {"default"}  # nobody moved
    assert all(status == 200 for _, _, status, _ in traffic.answers)
    # the rule's shadow put back (none); the rule the phase added moves nobody
    diff = [line for line in difflib.unified_diff(before.splitlines(), cluster.config.read_text().splitlines(), n=0)
            if line[:1] in "+-" and line[:3] not in ("+++", "---")]  # fmt: skip
    assert diff == ['+  - match: {userAgent: "kubelet/*"}', "+    percent: {pod: 0}"], diff
    metrics = cluster.metrics()
    assert 'kom_gateway_shadow_requests_total{group="pod",reason="content",result="mismatch",' \
           f'rule="{LABEL}"}}' in metrics

    cluster.control_call("PUT", "/groups/pod/faults", {"diverge": ""})
    traffic = Traffic(cluster.port)
    try:
        proc = controller(spec, tmp_path / "healthy.log", "--restart")
        assert proc.wait(60) == 0, (tmp_path / "healthy.log").read_text()
    finally:
        traffic.close()
    state = state_of(cluster)
    assert state["phase"] == "Succeeded" and state["shadow"] == "passed"
    actions = [h["action"] for h in state["history"]]
    assert actions.index("shadow-pass") < actions.index("promote")
    config = load_config_text(cluster.config.read_text())
    assert find_rule(config, {"userAgent": "kubelet/*"}).shadow is None
