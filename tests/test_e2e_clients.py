"""End to end with clients nobody here wrote: kubectl, the official kubernetes Python
client and curl, against `kom-gateway run` and `kom-gateway sim` as real processes on
127.0.0.1. Each request must land on the right simulated group."""

from __future__ import annotations

import json
import subprocess
import threading
import time
import urllib.request

import pytest
from e2e import Cluster, need


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = Cluster(tmp_path_factory.mktemp("e2e"))
    yield c
    c.stop()


def landed(cluster: Cluster, seq: int, method: str, fragment: str) -> set[str]:
    return {r["group"] for r in cluster.requests_since(seq)
            if r["method"] == method and fragment in r["target"] and "readyz" not in r["target"]}


POD_YAML = """apiVersion: v1
kind: Pod
metadata: {name: web, labels: {app: web}}
spec: {containers: [{name: c, image: nginx}]}
"""


def test_kubectl_crud_lands_on_the_right_groups(cluster):
    seq = cluster.last_seq()
    assert "web" in cluster.kubectl("create", "-f", "-", stdin=POD_YAML)
    assert landed(cluster, seq, "POST", "/pods") == {"pod"}
    out = cluster.kubectl("get", "pods", "-A")
    assert "default" in out and "web" in out
    header = out.splitlines()[0].split()
    assert header == ["NAMESPACE", "NAME", "READY", "STATUS", "RESTARTS", "AGE"]  # as kubectl shows
    assert out.splitlines()[1].split()[2:5] == ["1/1", "Running", "0"]
    assert landed(cluster, seq, "GET", "/api/v1/pods") == {"pod"}

    seq = cluster.last_seq()
    cm = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: settings}\ndata: {a: '1'}\n"
    assert "created" in cluster.kubectl("apply", "-f", "-", stdin=cm)
    assert "configured" in cluster.kubectl("apply", "-f", "-", stdin=cm.replace("'1'", "'2'"))
    assert json.loads(cluster.kubectl("get", "configmap", "settings", "-o", "json"))["data"] == {"a": "2"}
    assert landed(cluster, seq, "PATCH", "/configmaps/settings") == {"config"}
    assert landed(cluster, seq, "GET", "/configmaps/settings") == {"config"}

    seq = cluster.last_seq()
    cluster.kubectl("create", "deployment", "api", "--image=nginx")
    assert landed(cluster, seq, "POST", "/deployments") == {"default"}  # unclaimed
    assert "deleted" in cluster.kubectl("delete", "configmap", "settings")
    assert landed(cluster, seq, "DELETE", "/configmaps/settings") == {"config"}
    # the groups share one store: default sees what config wrote
    assert "settings" not in cluster.kubectl("get", "configmaps")


def test_kubectl_get_watch_sees_changes(cluster):
    proc = subprocess.Popen(
        [need("kubectl"), "--kubeconfig", str(cluster.kubeconfig), "get", "configmaps", "-w",
         "--request-timeout=0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    try:
        time.sleep(1.5)
        cluster.kubectl("create", "configmap", "watched-1", "--from-literal=a=b")
        deadline = time.monotonic() + 10
        while not any("watched-1" in line for line in lines) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert any("watched-1" in line for line in lines), (lines, proc.stderr)
    finally:
        proc.terminate()
        proc.wait(10)


def test_kubectl_exec_over_websocket(cluster):
    cluster.kubectl("run", "shell", "--image=busybox")
    seq = cluster.last_seq()
    assert cluster.kubectl("exec", "shell", "--", "echo", "hello", "gateway") == "hello gateway\n"
    assert cluster.kubectl("exec", "-i", "shell", "--", "cat", stdin="line 1\nline 2\n") == "line 1\nline 2\n"
    assert landed(cluster, seq, "GET", "/pods/shell/exec") == {"pod"}
    # many sessions in a row: every output complete, not one error in the gateway's log
    for i in range(25):
        assert cluster.kubectl("exec", "shell", "--", "echo", f"run {i}") == f"run {i}\n"
    log = cluster.gateway.log.read_text()
    assert "Traceback" not in log and "ERROR" not in log, log[-3000:]
    # counted like any request, under their subresource, once each session has ended (the
    # gateway sees the last one end a moment after kubectl exits)
    deadline = time.monotonic() + 5
    while True:
        with urllib.request.urlopen(f"http://127.0.0.1:{cluster.admin}/metrics", timeout=5) as r:
            metrics = r.read().decode()
        counted = [line for line in metrics.splitlines()
                   if line.startswith("kom_gateway_requests_total{")
                   and 'subresource="exec"' in line and 'code="101"' in line]
        if (counted and float(counted[0].rsplit(" ", 1)[1]) >= 27) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert counted and float(counted[0].rsplit(" ", 1)[1]) >= 27, counted


def test_exec_is_admitted_like_any_request(tmp_path):
    """A rate-limit rule on pods/exec holds exec sessions too (they come through the same
    intake as every request)."""
    c = Cluster(tmp_path, extra=(
        "overload:\n  rateLimits:\n    - {name: exec, match: {resources: [pods/exec]}, "
        "qps: 0.01, burst: 1}\n"))
    try:
        c.kubectl("run", "shell", "--image=busybox")
        assert c.kubectl("exec", "shell", "--", "echo", "one") == "one\n"
        out = subprocess.run(
            [need("kubectl"), "--kubeconfig", str(c.kubeconfig), "exec", "shell", "--", "echo",
             "two"], capture_output=True, text=True, timeout=60)
        assert out.returncode != 0 and "two" not in out.stdout
        with urllib.request.urlopen(f"http://127.0.0.1:{c.admin}/metrics", timeout=5) as r:
            metrics = r.read().decode()
        assert 'kom_gateway_shed_requests_total{group="pod",reason="rate-limit"}' in metrics
    finally:
        c.stop()


def test_curl_http2(cluster):
    curl = need("curl")
    out = subprocess.run(
        [curl, "-s", "--http2-prior-knowledge", "-w", "\\n%{http_version} %{http_code}",
         "-H", "Authorization: Bearer t", f"http://127.0.0.1:{cluster.port}/api/v1/nodes"],
        capture_output=True, text=True, timeout=30, check=True).stdout
    body, status = out.rsplit("\n", 1)
    assert status == "2 200"
    assert json.loads(body)["kind"] == "NodeList"
    head = subprocess.run(
        [curl, "-s", "-D", "-", "-o", "/dev/null", "--http2-prior-knowledge",
         f"http://127.0.0.1:{cluster.port}/api/v1/nodes"],
        capture_output=True, text=True, timeout=30, check=True).stdout
    assert "x-kom-sim-group: config" in head


def _kubernetes_client(cluster):
    kubernetes = pytest.importorskip("kubernetes")
    configuration = kubernetes.client.Configuration()
    configuration.host = f"http://127.0.0.1:{cluster.port}"
    configuration.api_key = {"authorization": "Bearer e2e"}
    return kubernetes, kubernetes.client.CoreV1Api(kubernetes.client.ApiClient(configuration))


def test_python_client_list_create_watch(cluster):
    kubernetes, api = _kubernetes_client(cluster)
    seq = cluster.last_seq()
    api.create_namespaced_config_map("default", {"metadata": {"name": "from-python"},
                                                 "data": {"k": "v"}})
    names = [cm.metadata.name for cm in api.list_namespaced_config_map("default").items]
    assert "from-python" in names
    assert landed(cluster, seq, "POST", "/configmaps") == {"config"}
    rv = api.list_pod_for_all_namespaces().metadata.resource_version
    api.create_namespaced_pod("default", {"metadata": {"name": "from-python"},
                                          "spec": {"containers": [{"name": "c", "image": "x"}]}})
    api.delete_namespaced_pod("from-python", "default")
    watch = kubernetes.watch.Watch()
    seen = []
    # resuming from an older resourceVersion replays what happened since
    for event in watch.stream(api.list_namespaced_pod, "default", resource_version=rv,
                              timeout_seconds=5):
        seen.append((event["type"], event["object"].metadata.name))
        if ("DELETED", "from-python") in seen:
            watch.stop()
    assert seen == [("ADDED", "from-python"), ("DELETED", "from-python")]
    assert landed(cluster, seq, "GET", "watch=") == {"pod"}


def test_watch_sees_every_event_while_its_group_is_killed_and_restarted(cluster):
    """An informer-style loop (re-watch from the last resourceVersion on a clean end)
    misses nothing: the gateway ends the broken watch cleanly, the re-watch falls back
    to default, which shares the store, so the resourceVersion is still valid."""
    kubernetes, api = _kubernetes_client(cluster)
    rv = api.list_namespaced_pod("default").metadata.resource_version
    seen: set[str] = set()
    groups: list[str] = []
    stop = threading.Event()

    def informer() -> None:
        nonlocal rv
        while not stop.is_set():
            try:
                response = api.list_namespaced_pod(
                    "default", watch=True, resource_version=rv, allow_watch_bookmarks=True,
                    timeout_seconds=30, _preload_content=False)
                groups.append(response.headers.get("x-kom-sim-group", ""))
                for line in response:
                    event = json.loads(line)
                    rv = event["object"]["metadata"]["resourceVersion"]
                    if event["type"] == "ADDED":
                        seen.add(event["object"]["metadata"]["name"])
                    if stop.is_set():
                        break
            except Exception:  # a refused re-watch during the switch: retry
                time.sleep(0.2)

    thread = threading.Thread(target=informer, daemon=True)
    thread.start()
    created = []

    def create(n: int) -> None:
        """As client-go does: retry a 503 that carries Retry-After. A retried create may
        meet 409 AlreadyExists, since the gateway said the first one may have applied."""
        for _ in range(n):
            name = f"churn-{len(created)}"
            body = {"metadata": {"name": name}, "spec": {"containers": [{"name": "c", "image": "x"}]}}
            for attempt in range(10):
                try:
                    api.create_namespaced_pod("default", body)
                    break
                except kubernetes.client.exceptions.ApiException as exc:
                    if exc.status == 409 and attempt > 0:
                        break
                    if exc.status != 503 or "retry-after" not in {k.lower() for k in exc.headers}:
                        raise
                    time.sleep(0.2)
            created.append(name)
            time.sleep(0.05)

    try:
        time.sleep(0.5)
        create(10)
        cluster.control_call("POST", "/groups/pod/down")
        create(10)  # served by default while pod is down
        cluster.control_call("POST", "/groups/pod/up")
        time.sleep(1.0)  # the probe brings pod back
        create(10)
        deadline = time.monotonic() + 15
        while not set(created) <= seen and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        stop.set()
    assert set(created) <= seen, sorted(set(created) - seen)
    assert groups[0] == "pod" and "default" in groups  # the watch really moved
