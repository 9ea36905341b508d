"""`kom-gateway plan`: what a cut-over would move, from an access log the gateway wrote
(pure, and as the command), and each group's watch-cache flags."""

from __future__ import annotations

import json

from kom_gateway.cli import main
from kom_gateway.config import load_config_text
from kom_gateway.kube.requestinfo import parse_request
from kom_gateway.plan import apiserver_flags, plan, read_access_log
from kom_gateway.proxy.accesslog import access_record
from kom_gateway.proxy.outcome import Outcome
from kom_gateway.routing.cutover import Client, bucket_of
from kom_gateway.routing.router import Decision

CONFIG = """
groups:
  default: {endpoints: ["https://10.0.0.1:6443"]}
  pod: {endpoints: ["https://10.0.0.2:6443"], resources: [pods, pods/log, bindings]}
  event: {endpoints: ["https://10.0.0.3:6443"], resources: [events, events.events.k8s.io]}
"""


def log_lines(seconds: int = 100) -> list[str]:
    """100 kubelets listing and watching pods (on default: not cut over yet), 10 kubectl
    users of which some are already on pod, an operator's deployments (default's)."""
    lines = []
    for i in range(100):
        kubelet = Client("kubelet/v1.31.0 (linux/amd64)", f"x509:CN=system:node:n{i}", "")
        for t, target in enumerate(("/api/v1/pods?fieldSelector=spec.nodeName%3Dn", "/api/v1/pods?watch=1")):
            info = parse_request("GET", target)
            decision = Decision("pod", "default", "not-cut-over", 0, 0.0)
            lines.append(json.dumps(access_record(1700000000 + (i + t) % seconds,
                                                  Outcome(kubelet, info, decision, "default", 200))))
    for i in range(10):
        user = Client("kubectl/v1.31.0", f"token:{i:032x}", "")
        info = parse_request("GET", "/api/v1/namespaces/a/pods/p")
        chosen = "pod" if i < 4 else "default"
        decision = Decision("pod", chosen, "cut-over" if chosen == "pod" else "not-cut-over", 1, 40.0)
        lines.append(json.dumps(access_record(1700000000 + seconds, Outcome(user, info, decision, chosen, 200))))
    op = Client("my-operator/v2", "token:" + "f" * 32, "")
    info = parse_request("GET", "/apis/apps/v1/deployments")
    lines.append(json.dumps(access_record(1700000050, Outcome(op, info, None, "default", 200))))
    lines.append("not json")
    return lines


def test_plan_counts_traffic_and_what_each_percent_moves():
    records, skipped = read_access_log(log_lines())
    assert skipped == 1
    traffic = {(t.program, t.home_group): t for t in plan(records, (5, 25, 100))}
    kubelet = traffic[("kubelet", "pod")]
    assert kubelet.requests == 200 and kubelet.watches == 100 and kubelet.seconds == 100
    assert kubelet.by_verb == {"list": 100, "watch": 100}
    # the same buckets the gateway uses decide who moves
    expected = sum(1 for i in range(100) if bucket_of(f"x509:CN=system:node:n{i}|kubelet") < 25)
    assert kubelet.moves[25] == (2 * expected, expected)
    assert kubelet.moves[100] == (200, 100)  # everything still on default
    kubectl = traffic[("kubectl", "pod")]
    assert kubectl.moves[100] == (6, 0)  # the 4 already on pod are not counted again
    assert traffic[("my-operator", "default")].moves[100] == (0, 0)  # default's own
    as_json = kubelet.as_json()
    assert as_json["requestsPerSecond"] == 2.0 and as_json["wouldMove"]["100%"]["watchesPerSecond"] == 1.0


def test_plan_command_table_json_and_stdin(tmp_path, capsys, monkeypatch):
    log = tmp_path / "access.log"
    log.write_text("\n".join(log_lines()) + "\n")
    assert main(["plan", str(log), "--percent", "25"]) == 0
    table = capsys.readouterr().out
    assert "kubelet" in table and "moves at 25%" in table and "1 lines were not" in table
    assert main(["plan", str(log), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert {t["program"] for t in data["traffic"]} == {"kubelet", "kubectl", "my-operator"}
    assert main(["plan", str(tmp_path / "missing.log")]) == 1
    assert main(["plan"]) == 2


def test_apiserver_flags_match_each_groups_claims(tmp_path, capsys):
    config = load_config_text(CONFIG)
    flags = apiserver_flags(config)
    assert flags["default"].flags == []  # caches everything, as kube-apiserver does
    assert flags["pod"].flags == ["--default-watch-cache-size=0", "--watch-cache-sizes=pods#1000"]
    assert flags["event"].flags[1] == "--watch-cache-sizes=events#1000,events.events.k8s.io#1000"
    assert "pods" in flags["event"].uncached and "nodes" in flags["pod"].uncached
    path = tmp_path / "gw.yaml"
    path.write_text(CONFIG)
    assert main(["plan", "--apiserver-flags", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    assert "event: --default-watch-cache-size=0" in out and "warning: this group's apiservers" in out
    assert main(["plan", "--apiserver-flags"]) == 2
