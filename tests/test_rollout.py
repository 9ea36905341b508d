"""The rollout controller's pure parts: spec, the YAML edit, guard readings, decisions,
state, status; and the per-rule outcome metrics the guards read."""

from __future__ import annotations

import difflib
import io
import json
import os
import time
from pathlib import Path

import pytest
from prometheus_client import generate_latest

from kom_gateway.config.loader import load_config_text
from kom_gateway.config.model import AccessLogSettings
from kom_gateway.kube.requestinfo import parse_request
from kom_gateway.proxy.accesslog import AccessLog
from kom_gateway.proxy.metrics import Metrics
from kom_gateway.proxy.outcome import Outcome, OutcomeRecorder, moved_outcome
from kom_gateway.rollout import machine
from kom_gateway.rollout.edit import EditError, current_percent, find_rule, set_percent, set_shadow
from kom_gateway.rollout.guards import (
    Readings,
    ReplicaSample,
    Sample,
    SampleWindow,
    ShadowReadings,
    judge,
    quantile,
    readings_between,
)
from kom_gateway.rollout.runner import dry_run, status_report
from kom_gateway.rollout.sources import promql_string, replica_sample
from kom_gateway.rollout.spec import (
    ConfigMapTarget,
    FileTarget,
    ShadowPhase,
    SpecError,
    format_duration,
    parse_duration,
    parse_spec,
)
from kom_gateway.rollout.state import Lease, RolloutState
from kom_gateway.rollout.targets import Conflict, FileTargetIO
from kom_gateway.routing.cutover import Client, ShadowSpec
from kom_gateway.routing.router import Decision

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = (ROOT / "config" / "example.yaml").read_text()
KUBELET = {"userAgent": "kubelet/*", "userGroup": "system:nodes"}
SPEC = """
target: {file: /etc/kom-gateway/config.yaml}
rule: {userAgent: "kubelet/*"}
group: pod
steps: [1, 5, 25, 50, 100]
hold: 10m
guards:
  source: {gateways: ["http://127.0.0.1:9090/"]}
  window: 2m
"""


def spec(**changes: str):
    text = SPEC
    for key, value in changes.items():
        text = "\n".join(line for line in text.splitlines() if not line.startswith(key + ":"))
        text += f"\n{key}: {value}\n"
    return parse_spec(text, "spec.yaml")


# -- spec -------------------------------------------------------------------------------------
def test_spec_defaults_and_names():
    s = spec()
    assert s.target == FileTarget("/etc/kom-gateway/config.yaml")
    assert s.steps == (1, 5, 25, 50, 100) and s.hold == 600 and s.guards.window == 120
    assert s.guards.gateways == ("http://127.0.0.1:9090",)
    assert (s.guards.max_error_ratio, s.guards.max_fallback_ratio, s.guards.max_p99_seconds) == (0.01, 0.01, 1.0)
    assert s.on_failure == "rollback" and s.rollback_to == "previous"
    assert s.interval == 10 and s.guards.min_requests == 20
    assert s.label == "userAgent=kubelet/*"  # as the gateway's metrics name the rule
    assert s.describe() == "userAgent=kubelet/* -> pod through [1%, 5%, 25%, 50%, 100%]"


def test_spec_configmap_target_and_on_failure_forms():
    s = spec(target="{configMap: {name: kom-gateway}, kubeconfig: /k, context: c}",
             onFailure="{action: rollback, to: 0}")  # fmt: skip
    assert s.target == ConfigMapTarget("kube-system", "kom-gateway", "config.yaml", "/k", "c")
    assert s.rollback_to == "0"
    assert spec(onFailure="pause").on_failure == "pause"


def test_spec_reports_every_problem_with_its_key():
    with pytest.raises(SpecError) as err:
        parse_spec("""
target: {file: a, configMap: {name: b}}
rule: {userAgent: "["}
group: default
steps: [5, 1, 150]
hold: soon
guards: {source: {}, maxErrorRatio: 2, surprise: 1}
onFailure: explode
""", "s.yaml")  # fmt: skip
    text = err.value.render()
    for words in ("target: exactly one of file or configMap", "rule.userAgent: bad glob",
                  "group: default is where clients come from", "steps[1]: steps must rise",
                  "steps[2]: must be a percent", "hold: 'soon' is not a duration",
                  "guards.source: exactly one of gateways or prometheus",
                  "guards.maxErrorRatio: must be a ratio", "guards.surprise: unknown key",
                  "onFailure: rollback or pause"):  # fmt: skip
        assert words in text, text
    assert all(line.startswith("s.yaml: ") for line in text.splitlines())


def test_spec_interval_must_leave_two_readings_per_window():
    with pytest.raises(SpecError, match="fewer than 2 readings"):
        spec(interval="2m")


def test_durations():
    assert parse_duration("10m") == 600 and parse_duration("1h30m") == 5400
    assert parse_duration("500ms") == 0.5 and parse_duration(90) == 90
    for bad in ("", "10", "ten minutes", "-5s", 0, True):
        with pytest.raises(ValueError):
            parse_duration(bad)
    assert [format_duration(x) for x in (0.5, 42, 600, 630, 5400)] == ["0.5s", "42s", "10m", "10m30s", "1h30m"]


# -- the edit ---------------------------------------------------------------------------------
def changed_lines(before: str, after: str) -> list[str]:
    return [line for line in difflib.unified_diff(before.splitlines(), after.splitlines(), n=0)
            if line[:1] in "+-" and line[:3] not in ("+++", "---")]  # fmt: skip


def test_an_existing_percent_changes_one_number_and_nothing_else():
    after = set_percent(EXAMPLE, KUBELET, "pod", 50)
    assert changed_lines(EXAMPLE, after) == [
        '-    percent: {pod: 25, config: 100, event: 100}',
        '+    percent: {pod: 50, config: 100, event: 100}',
    ]
    assert current_percent(load_config_text(after), KUBELET, "pod") == 50
    assert "12.5" in set_percent(EXAMPLE, KUBELET, "pod", 12.5)


def test_a_group_is_added_to_a_rule_and_a_missing_rule_is_appended():
    cm = {"userAgent": "kube-controller-manager/*"}
    assert changed_lines(EXAMPLE, set_percent(EXAMPLE, cm, "pod", 5)) == [
        "-    percent: {event: 100}", "+    percent: {event: 100, pod: 5}"]  # fmt: skip
    op = {"userAgent": "my-operator/*"}
    assert changed_lines(EXAMPLE, set_percent(EXAMPLE, op, "config", 1)) == [
        '+  - match: {userAgent: "my-operator/*"}', "+    percent: {config: 1}"]  # fmt: skip


def test_block_layouts_and_following_sections_are_respected():
    text = """groups:
  default: {endpoints: ["http://a:1"]}
  pod:
    endpoints: ["http://b:1"]
    resources: [pods]
cutover:
- match:
    userAgent: "kube-scheduler/*"
  percent:
    pod: 100

# health comes next: a new rule goes above this comment
health: {intervalSeconds: 1}
"""
    after = set_percent(text, {"userAgent": "kube-scheduler/*"}, "pod", 40)
    assert changed_lines(text, after) == ["-    pod: 100", "+    pod: 40"]
    after = set_percent(text, {"userAgent": "kubelet/*"}, "pod", 1)
    assert changed_lines(text, after) == ['+- match: {userAgent: "kubelet/*"}', "+  percent: {pod: 1}"]
    assert after.index("kubelet/*") < after.index("# health")


def test_a_config_without_cutover_gets_one_by_round_trip_with_comments_kept():
    text = '# routing\ngroups:\n  default: {endpoints: ["http://a:1"]}  # all\n  pod: {endpoints: ["http://b:1"], resources: [pods]}\n'
    after = set_percent(text, {"userAgent": "kubelet/*"}, "pod", 10)
    assert "# routing" in after and "# all" in after
    assert current_percent(load_config_text(after), {"userAgent": "kubelet/*"}, "pod") == 10


def test_a_quoted_percent_goes_through_the_round_trip():
    text = EXAMPLE.replace("percent: {pod: 25,", 'percent: {pod: "25",')
    with pytest.raises(Exception):  # noqa: B017 (a string percent does not pass check)
        load_config_text(text)
    with pytest.raises(EditError, match="would not pass check"):
        set_percent(text, KUBELET, "pod", 50)


def test_edits_that_check_refuses_are_not_made():
    with pytest.raises(EditError, match="no group 'nosuch'"):
        set_percent(EXAMPLE, KUBELET, "nosuch", 5)
    with pytest.raises(EditError, match="would not pass check"):
        set_percent("groups: {}\n", KUBELET, "pod", 5)


# -- guard readings ---------------------------------------------------------------------------
def sample(t: float, **replicas: tuple[dict, dict]) -> Sample:
    return Sample(t, {name: ReplicaSample(o, b) for name, (o, b) in replicas.items()})


def test_readings_are_counter_increases_summed_over_replicas():
    inf = float("inf")
    start = sample(0, a=({"2xx": 100, "fallback": 1}, {0.1: 90, 1.0: 100, inf: 100}),
                   b=({"2xx": 50}, {0.1: 50, 1.0: 50, inf: 50}))  # fmt: skip
    end = sample(60, a=({"2xx": 180, "5xx": 2, "fallback": 3}, {0.1: 160, 1.0: 182, inf: 182}),
                 b=({"2xx": 10, "broken": 1}, {0.1: 10, 1.0: 11, inf: 11}),  # restarted
                 c=({"2xx": 999}, {inf: 999}))  # fmt: skip  # new: no baseline, left out
    r = readings_between(start, end)
    assert (r.seconds, r.replicas) == (60, 2)
    assert r.answered == 80 + 2 + 10 + 1 and r.fallbacks == 2 and r.requests == 95
    assert r.errors == 3 and r.error_ratio == pytest.approx(3 / 93)
    assert r.fallback_ratio == pytest.approx(2 / 95)


def test_quantile_interpolates_as_prometheus():
    inf = float("inf")
    assert quantile(0.99, {}) is None
    assert quantile(0.5, {0.1: 50, 0.2: 100, inf: 100}) == pytest.approx(0.1)
    assert quantile(0.99, {0.1: 0, 0.2: 100, inf: 100}) == pytest.approx(0.199)
    assert quantile(0.99, {1.0: 10, inf: 100}) == 1.0  # in +Inf: the highest finite bound


def test_judge():
    from kom_gateway.rollout.spec import Guards

    g = Guards(min_requests=20, max_error_ratio=0.01, max_fallback_ratio=0.05, max_p99_seconds=1)
    assert judge(Readings(60, 10, 10, 0, 0, 0.1), g).kind == "insufficient"
    assert judge(Readings(60, 100, 100, 1, 0, 0.1), g).kind == "pass"
    bad = judge(Readings(60, 100, 90, 2, 10, 2.0), g)
    assert bad.kind == "fail" and len(bad.reasons) == 3
    assert "fallback ratio 10.00% > 5.00%" in bad.describe()


def test_the_window_keeps_one_sample_before_its_start():
    w = SampleWindow()
    for t in range(0, 100, 10):
        w.add(sample(t, a=({"2xx": t}, {})), window=30)
    assert [s.time for s in w.samples] == [60, 70, 80, 90]
    assert w.readings().seconds == 30


# -- decisions --------------------------------------------------------------------------------
def readings(requests: float = 100, errors: float = 0, fallbacks: float = 0, seconds: float = 120):
    return Readings(seconds, requests, requests - fallbacks, errors, fallbacks, 0.05, 1)


def test_a_rollout_walks_its_steps_and_completes():
    s = spec()
    st = machine.new_state(s, 0.0, now=0)
    a = machine.decide(s, st, 0.0, [], None, 0)
    assert (a.kind, a.percent) == ("promote", 1)
    machine.advance(st, a, 0)
    a = machine.decide(s, st, 1.0, [0.0, 1.0], None, 1)
    assert a.kind == "hold" and "1 of 2 do" in a.message
    a = machine.decide(s, st, 1.0, [1.0, 1.0], None, 2)
    assert a.kind == "applied"
    machine.advance(st, a, 2)
    a = machine.decide(s, st, 1.0, [1.0], readings(), 300)
    assert a.kind == "hold" and "for 4m58s of 10m" in a.message
    a = machine.decide(s, st, 1.0, [1.0], readings(requests=5), 700)
    assert a.kind == "hold" and "too little traffic" in a.message
    a = machine.decide(s, st, 1.0, [1.0], readings(seconds=30), 700)
    assert a.kind == "hold" and "full 2m guard window" in a.message
    a = machine.decide(s, st, 1.0, [1.0], readings(), 700)
    assert (a.kind, a.percent) == ("promote", 5)
    for percent in (5, 25, 50, 100):
        machine.advance(st, a, 700)
        assert st.percent == percent and st.step_applied is None
        st.step_applied = 700
        a = machine.decide(s, st, float(percent), [float(percent)], readings(), 1400)
    assert a.kind == "succeed"
    machine.advance(st, a, 1400)
    assert st.phase == "Succeeded"
    assert [h["action"] for h in st.history] == ["promote", "applied", "promote", "promote", "promote", "promote", "succeed"]
    assert machine.decide(s, st, 100.0, [], None, 1500).kind == "ended"


def test_a_failed_guard_rolls_back_to_the_previous_step_or_zero_or_pauses():
    s = spec()
    st = machine.new_state(s, 25.0, now=0)  # resumes from what the config holds
    assert st.step == 2
    st.step_applied = 0
    a = machine.decide(s, st, 25.0, [25.0], readings(fallbacks=50), 10)  # before the hold ends
    assert (a.kind, a.percent) == ("rollback", 5)
    assert "fallback ratio 50.00% > 1.00%" in a.message
    machine.advance(st, a, 10)
    assert st.phase == "RolledBack" and st.percent == 5
    st2 = machine.new_state(s, 1.0, 0)
    st2.step_applied = 0
    a = machine.decide(s, st2, 1.0, [1.0], readings(errors=5), 10)
    assert (a.kind, a.percent) == ("rollback", 1.0)  # before step 0: where it started
    to_zero = spec(onFailure="{action: rollback, to: 0}")
    st3 = machine.new_state(to_zero, 50.0, 0)
    st3.step_applied = 0
    assert machine.decide(to_zero, st3, 50.0, [50.0], readings(errors=5), 10).percent == 0
    paused = spec(onFailure="pause")
    st4 = machine.new_state(paused, 50.0, 0)
    st4.step_applied = 0
    a = machine.decide(paused, st4, 50.0, [50.0], readings(errors=5), 10)
    assert a.kind == "pause" and a.percent is None


def test_an_edit_by_someone_else_pauses_and_resume_continues_from_it():
    s = spec()
    st = machine.new_state(s, 5.0, 0)
    a = machine.decide(s, st, 30.0, [30.0], readings(), 10)
    assert a.kind == "pause" and "changed outside the rollout (5% -> 30%)" in a.message
    machine.advance(st, a, 10)
    machine.resume(st, s, 30.0, 20)
    assert (st.phase, st.percent, st.step) == ("Progressing", 30.0, 2)


def test_reconcile_an_interrupted_write_and_new_steps():
    s = spec()
    st = machine.new_state(s, 5.0, 0)
    st.writing = 25.0
    assert machine.reconcile(st, s, 25.0, 10) == ["the interrupted write of 25% had landed"]
    assert (st.percent, st.step, st.writing) == (25.0, 2, None)
    st.writing = 50.0
    assert "had not landed" in machine.reconcile(st, s, 25.0, 10)[0]
    assert st.percent == 25.0
    fewer = spec(steps="[10, 100]")
    assert "steps are now [10%, 100%]" in machine.reconcile(st, fewer, 25.0, 10)
    assert st.step == 0


# -- state, lease, status ---------------------------------------------------------------------
def test_state_round_trips_through_json():
    st = machine.new_state(spec(), 5.0, 1.0)
    st.lease = Lease.mine(1.0, 15)
    st.note(2.0, "promote", "5% -> 25%", percent=25)
    again = RolloutState.from_json(st.to_json())
    assert again == st


def test_a_lease_lapses_by_time_or_when_its_process_is_gone():
    lease = Lease.mine(time.time(), 15)
    assert not lease.lapsed(time.time())
    assert lease.lapsed(time.time() + 16)
    gone = Lease("h/1/x", lease.host, 2**22 + 12345, time.time(), 15)  # beyond pid_max
    assert gone.lapsed(time.time())
    elsewhere = Lease("other/1/x", "another-host", os.getpid(), time.time(), 15)
    assert not elsewhere.lapsed(time.time())


def test_status_says_what_happens_next():
    s = spec()
    assert status_report(s, None, 0.0, 0)["next"] == "`rollout run` moves 0% -> 1%"
    st = machine.new_state(s, 25.0, 0)
    st.step_applied = 100
    report = status_report(s, st, 25.0, 400)
    assert report["step"] == "3 of 5" and report["held"] == "5m of 10m"
    assert report["next"] == "promote to 50% in 5m if the guards pass"
    assert "a running controller pauses" in status_report(s, st, 30.0, 400)["next"]


def test_file_target_writes_are_compare_and_swap(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(EXAMPLE)
    target = FileTargetIO(FileTarget(str(config)), "userAgent=kubelet/*", "pod")
    snap = target.read()
    st = machine.new_state(spec(), 0, 0)
    snap = target.write(snap, EXAMPLE + "\n", st)
    assert target.read().state == st and config.read_text() == EXAMPLE + "\n"
    config.write_text(EXAMPLE)  # someone else
    with pytest.raises(Conflict):
        target.write(snap, "x", st)
    assert config.read_text() == EXAMPLE
    assert target.lock("me") is None
    assert FileTargetIO(FileTarget(str(config)), "userAgent=kubelet/*", "pod").lock("you") == "me"


# -- the metrics the guards read --------------------------------------------------------------
def test_moved_requests_are_counted_per_rule_and_outcome():
    config = load_config_text(EXAMPLE)
    router = config.router()
    kubelet = Client("kubelet/v1.31.0", "x509:CN=system:node:n1", "", "system:node:n1", ("system:nodes",))
    info = parse_request("GET", "/api/v1/pods")
    decision = router.decide(info, kubelet)
    if decision.target != "pod":  # 25%: use a decision as if it moved
        decision = Decision(decision.home, "pod", "cut-over", decision.rule, 25.0)
    metrics = Metrics()
    recorder = OutcomeRecorder(metrics, AccessLog(AccessLogSettings(enabled=False)))
    recorder.record(Outcome(kubelet, info, decision, "pod", 200, 0.02))
    recorder.record(Outcome(kubelet, info, decision, "pod", 503, 0.02))
    recorder.record(Outcome(kubelet, info, decision, "pod", 200, 0.5, broken=True))
    recorder.record(Outcome(kubelet, info, decision, "default", 200, 0.1, fallback="upstream-5xx"))
    recorder.record(Outcome(kubelet, info, decision, "gateway", 429))
    not_moved = Decision("pod", "default", "not-cut-over", decision.rule, 25.0)
    recorder.record(Outcome(kubelet, info, not_moved, "default", 200, 0.1))
    metrics.flush()
    text = generate_latest(metrics.registry).decode()
    got = replica_sample(text, "userAgent=kubelet/* userGroup=system:nodes", "pod")
    assert got.outcomes == {"2xx": 1, "5xx": 1, "broken": 1, "fallback": 1, "gateway": 1}
    assert got.buckets[float("inf")] == 3  # latency of what the group answered
    assert got.percent == 0.0  # no percent gauge in this registry: the rule moves nobody
    assert moved_outcome(Outcome(kubelet, info, decision, "pod", 101), "pod") == "1xx"


def test_shadow_reads_are_read_per_rule_and_the_candidates_latency_per_group():
    metrics = Metrics()
    rule = "userAgent=kubelet/*"
    for result, reason, n in (("match", "", 5), ("mismatch", "content", 2), ("skipped", "budget", 7)):
        metrics.shadow_requests.labels(rule, "pod", result, reason).inc(n)
    metrics.shadow_requests.labels("userAgent=other/*", "pod", "match", "").inc(100)
    metrics.shadow_duration.labels("pod").observe(0.02)
    metrics.shadow_percent.labels(rule, "pod").set(5)
    got = replica_sample(generate_latest(metrics.registry).decode(), rule, "pod")
    assert got.shadow == {"match": 5, "mismatch": 2, "skipped": 7}
    assert got.shadow_buckets[float("inf")] == 1 and got.shadow_percent == 5
    window = SampleWindow()
    window.add(Sample(0, {"a": ReplicaSample()}), 60)
    window.add(Sample(10, {"a": got}), 60)
    r = window.shadow_readings()
    assert (r.compared, round(r.bad_ratio, 4), r.replicas) == (7, round(2 / 7, 4), 1)
    assert r.p99 == pytest.approx(0.0248, abs=1e-3)


def test_promql_strings_are_escaped():
    assert promql_string('userAgent=a"b\\c') == '"userAgent=a\\"b\\\\c"'


def test_state_file_is_named_by_rule_and_group(tmp_path):
    a = FileTargetIO(FileTarget(str(tmp_path / "c.yaml")), "userAgent=kubelet/*", "pod")
    b = FileTargetIO(FileTarget(str(tmp_path / "c.yaml")), "userAgent=kubelet/*", "config")
    assert a.state_path != b.state_path and a.state_path.startswith(str(tmp_path / "c.yaml.rollout-pod-"))
    json.dumps(a.describe())


def test_the_shipped_examples_are_valid():
    """The example spec parses; the in-cluster controller manifests are valid Kubernetes,
    and its Role allows exactly what the controller does (get/update the ConfigMap the
    spec names, create Events)."""
    import yaml

    from kom_gateway.rollout.spec import load_spec_file

    example = load_spec_file(str(ROOT / "config" / "rollout" / "kubelet-to-pod.yaml"))
    assert isinstance(example.target, ConfigMapTarget) and example.guards.prometheus
    documents = list(yaml.safe_load_all((ROOT / "config" / "rollout" / "controller.yaml").read_text()))
    role = next(d for d in documents if d["kind"] == "Role")
    assert role["rules"][0] == {"apiGroups": [""], "resources": ["configmaps"],
                                "resourceNames": [example.target.name], "verbs": ["get", "update"]}  # fmt: skip
    assert role["metadata"]["namespace"] == example.target.namespace
    try:
        import kubernetes_validate
    except ImportError:
        if os.environ.get("KOM_REQUIRE_CLIENTS") == "1":
            raise
        pytest.skip("needs the test extra (kubernetes-validate)")
    for document in documents:
        for version in ("1.29.0", "1.33.0"):
            kubernetes_validate.validate(document, version, strict=True)


# -- the loop, with the target and the source in memory -----------------------------------
class MemoryTarget:
    def __init__(self, text: str, fail_config_writes: bool = False) -> None:
        self.text, self.state, self.version = text, None, 0
        self.fail_config_writes = fail_config_writes
        self.events: list[tuple[bool, str, str]] = []

    def describe(self) -> str:
        return "memory"

    def read(self):
        from kom_gateway.rollout.targets import Snapshot

        state = RolloutState.from_json(self.state) if self.state else None
        return Snapshot(self.text, str(self.version), state)

    def write(self, snapshot, text, state):
        from kom_gateway.rollout.targets import Snapshot, TargetError

        if snapshot.version != str(self.version):
            raise Conflict("changed")
        if text is not None and self.fail_config_writes:
            raise TargetError("cannot write memory: read-only")
        self.state = state.to_json()
        if text is not None:
            self.text = text
        self.version += 1
        return Snapshot(self.text, str(self.version), state)

    def event(self, warning, reason, message):
        self.events.append((warning, reason, message))

    def lock(self, holder):
        return None


class ScriptedSource:
    """Serves whatever percent the target holds, and fixed readings."""

    def __init__(self, target: MemoryTarget, readings: Readings) -> None:
        self.target, self.fixed = target, readings

    def observe(self, now):
        return []

    def clear(self):
        pass

    def readings(self, since, now):
        return self.fixed

    def served(self):
        config = load_config_text(self.target.text)
        return [current_percent(config, {"userAgent": "kubelet/*"}, "pod")]

    shadow_fixed = None

    def shadow_readings(self, since, now):
        return self.shadow_fixed

    def shadow_served(self):
        rule = find_rule(load_config_text(self.target.text), {"userAgent": "kubelet/*"})
        return [rule.shadow.percent if rule is not None and rule.shadow is not None else 0.0]


def test_the_loop_walks_a_rollout_with_events_and_releases_its_lease():
    import threading

    from kom_gateway.rollout.runner import Rollout

    s = spec(hold="1s", steps="[50, 100]")
    target = MemoryTarget(EXAMPLE)
    clock = iter(range(0, 10_000, 5))
    rollout = Rollout(s, target, ScriptedSource(target, readings()), clock=lambda: float(next(clock)))
    assert rollout.run(threading.Event()) == 0
    assert current_percent(load_config_text(target.text), {"userAgent": "kubelet/*"}, "pod") == 100
    state = RolloutState.from_json(target.state)
    assert state.phase == "Succeeded" and state.lease is None
    reasons = [reason for _, reason, _ in target.events]
    assert reasons == ["RolloutStarted", "RolloutPromoted", "RolloutStepServed", "RolloutPromoted",
                       "RolloutStepServed", "RolloutSucceeded"]  # fmt: skip
    # running a completed rollout again is a no-op success; --restart starts it over
    version = target.version
    again = Rollout(s, target, ScriptedSource(target, readings()), clock=lambda: float(next(clock)))
    assert again.run(threading.Event()) == 0 and target.version == version
    restarted = Rollout(s, target, ScriptedSource(target, readings()), clock=lambda: float(next(clock)))
    assert restarted.run(threading.Event(), restart=True) == 0
    assert RolloutState.from_json(target.state).start_percent == 100


def test_a_target_that_cannot_be_written_stops_the_rollout_with_the_config_untouched():
    import threading

    from kom_gateway.rollout.runner import Rollout
    from kom_gateway.rollout.targets import TargetError

    target = MemoryTarget(EXAMPLE, fail_config_writes=True)
    rollout = Rollout(spec(), target, ScriptedSource(target, readings()))
    with pytest.raises(TargetError, match="read-only"):
        rollout.run(threading.Event())
    assert target.text == EXAMPLE
    state = RolloutState.from_json(target.state)
    assert state.lease is None and state.percent == 0
    assert state.writing == 1  # resolved on the next start: the write had not landed
    assert "had not landed" in Rollout(spec(), target, ScriptedSource(target, readings())).start(False, False)[1].history[-1]["message"]



def test_dry_run_prints_every_edit_to_come_and_writes_nothing():
    import io

    from kom_gateway.rollout.runner import dry_run

    target = MemoryTarget(EXAMPLE)
    out = io.StringIO()
    kubelet = spec(rule='{userAgent: "kubelet/*", userGroup: "system:nodes"}')
    assert dry_run(kubelet, target, out) == 0
    text = out.getvalue()
    assert "now 25%" in text
    assert [line for line in text.splitlines() if line.startswith("# ")] == [
        "# 25% -> 50%, after a hold of 10m with guards passing",
        "# 50% -> 100%, after a hold of 10m with guards passing",
    ]
    assert "+    percent: {pod: 50, config: 100, event: 100}" in text
    assert "+    percent: {pod: 100, config: 100, event: 100}" in text
    assert "On a failed guard: roll back to the step before." in text
    assert target.text == EXAMPLE and target.state is None and target.version == 0


def test_a_lease_from_another_host_is_taken_over_only_once_it_stops_being_renewed():
    """ConfigMap targets have no flock and a crashed pod's host is gone: its lease is
    watched; renewed -> a live controller, refused; not renewed -> taken over."""
    import threading

    from kom_gateway.rollout.runner import Rollout, RolloutError

    s = spec()
    target = MemoryTarget(EXAMPLE)
    st = machine.new_state(s, 0.0, time.time())
    st.lease = Lease("elsewhere/1/a", "another-host", 1, time.time(), 0.5)
    target.state = st.to_json()
    stop = threading.Event()

    def renew() -> None:
        while not stop.wait(0.05):
            live = RolloutState.from_json(target.state)
            live.lease.renewed = time.time()
            target.state = live.to_json()

    renewer = threading.Thread(target=renew)
    renewer.start()
    try:
        with pytest.raises(RolloutError, match=r"another controller drives .*elsewhere/1/a"):
            Rollout(s, target, ScriptedSource(target, readings())).start(False, False)
    finally:
        stop.set()
        renewer.join()
    started = time.monotonic()
    _, state = Rollout(s, target, ScriptedSource(target, readings())).start(False, False)
    assert state.lease.holder != "elsewhere/1/a" and time.monotonic() - started < 3
    assert "resuming" in state.history[-1]["message"]


def test_a_conflict_after_the_config_write_does_not_lose_the_step():
    """Someone else writes the target (another rule's rollout on the same ConfigMap)
    right after this controller wrote the new percent: its state write conflicts, and
    the next reading carries on from the percent it wrote, not from the stale stored
    state (which would look like an edit by hand and pause)."""
    import threading

    from kom_gateway.rollout.runner import Rollout

    class BusyTarget(MemoryTarget):
        def write(self, snapshot, text, state):
            result = super().write(snapshot, text, state)
            if text is not None:
                self.version += 1  # a write by someone else lands in between
            return result

    s = spec(hold="1s", steps="[50, 100]")
    target = BusyTarget(EXAMPLE)
    clock = iter(range(0, 10_000, 5))
    rollout = Rollout(s, target, ScriptedSource(target, readings()), clock=lambda: float(next(clock)))
    assert rollout.run(threading.Event()) == 0
    state = RolloutState.from_json(target.state)
    assert state.phase == "Succeeded" and state.writing is None
    assert not [h for h in state.history if h["action"] == "pause"]


def test_a_hand_edit_after_a_completed_rollout_is_named_with_what_to_run(tmp_path, capsys):
    """Issue: after a completed rollout the percent was set back to 0 by hand; `status`
    said "Succeeded, 0%" and `run` "already completed at 100%: nothing to do". Both now
    say the config and the rollout disagree, and what to run."""
    from kom_gateway.cli import main
    from kom_gateway.rollout.state import SUCCEEDED

    config = tmp_path / "config.yaml"
    config.write_text(EXAMPLE)  # kubelet/* holds pod 25%
    spec_file = tmp_path / "spec.yaml"
    text = SPEC.replace("/etc/kom-gateway/config.yaml", str(config)).replace(
        'rule: {userAgent: "kubelet/*"}', 'rule: {userAgent: "kubelet/*", userGroup: system:nodes}')
    spec_file.write_text(text)
    the_spec = parse_spec(text, str(spec_file))
    target = FileTargetIO(FileTarget(str(config)), the_spec.label, "pod")
    done = machine.new_state(the_spec, 100.0, 0)
    done.phase, done.percent = SUCCEEDED, 100.0
    target.write(target.read(), EXAMPLE, done)  # completed at 100%; the config says 25%
    assert main(["rollout", "status", str(spec_file)]) == 0
    out = capsys.readouterr().out
    assert "phase: Succeeded" in out
    assert "drift: the config holds 25% for pod but this rollout ended Succeeded at 100%" in out
    assert "`rollout run --restart`" in out and "--resume" in out
    assert main(["rollout", "run", str(spec_file)]) == 1
    err = capsys.readouterr().err
    assert "edited by hand" in err and "nothing to do" not in err


# -- the shadow phase ---------------------------------------------------------------------------
SHADOW_PHASE = "{percent: 5, hold: 1s, maxMismatchRatio: 0.01, maxP99Seconds: 0.5}"


def test_the_shadow_phase_is_read_with_its_defaults_and_checked():
    s = spec(shadow=SHADOW_PHASE)
    assert s.shadow == ShadowPhase(5.0, 1.0, 0.01, 0.5, 10.0)
    assert spec(shadow="{}").shadow == ShadowPhase(5.0, 600.0, 0.001, 1.0, 10.0)
    with pytest.raises(SpecError) as exc:
        spec(shadow="{percent: 0, maxMismatchRatio: 2, hold: soon, extra: 1}")
    text = str(exc.value)
    for key in ("shadow.percent", "shadow.maxMismatchRatio", "shadow.hold", "shadow.extra"):
        assert key in text


def shadow_readings(compared: float = 100, mismatches: float = 0, p99: float = 0.05):
    return ShadowReadings(120, {"match": compared - mismatches, "mismatch": mismatches}, p99, 1)


def test_a_shadow_phase_runs_before_anyone_moves_and_then_the_steps():
    import threading

    from kom_gateway.rollout.runner import Rollout, status_report

    s = spec(hold="1s", steps="[50, 100]", shadow=SHADOW_PHASE)
    target = MemoryTarget(EXAMPLE)
    source = ScriptedSource(target, readings())
    source.shadow_fixed = shadow_readings()
    seen = []
    ticks = iter(range(0, 10_000, 5))

    def clock():
        t = float(next(ticks))
        config = load_config_text(target.text)
        rule = find_rule(config, {"userAgent": "kubelet/*"})
        seen.append((rule.shadow if rule else None, current_percent(config, s.rule, "pod")))
        return t

    assert Rollout(s, target, source, clock=clock).run(threading.Event()) == 0
    reasons = [reason for _, reason, _ in target.events]
    assert reasons[:5] == ["RolloutStarted", "RolloutShadowStarted", "RolloutShadowServed",
                           "RolloutShadowPassed", "RolloutPromoted"]  # fmt: skip
    # shadowing while nobody moved; off again before the first step
    assert (ShadowSpec("pod", 5.0, 10.0), 0.0) in seen
    assert all(shadow is None for shadow, percent in seen if percent > 0)
    final = load_config_text(target.text)
    assert find_rule(final, {"userAgent": "kubelet/*"}).shadow is None
    assert current_percent(final, s.rule, "pod") == 100
    state = RolloutState.from_json(target.state)
    assert status_report(s, state, 100.0, 1e9)["shadow"] == "passed"
    assert "runs the shadow phase (1s), then moves 0% -> 50%" in status_report(s, None, 0.0, 0)["next"]
    out = io.StringIO()
    dry_run(s, MemoryTarget(EXAMPLE), out)
    assert "# first, the shadow phase for 1s" in out.getvalue()
    assert "+    shadow: {group: pod, percent: 5, maxPerSecond: 10}" in out.getvalue()


def test_a_failed_shadow_phase_stops_the_rollout_before_anyone_moved():
    import threading

    from kom_gateway.rollout.runner import Rollout

    s = spec(hold="1s", steps="[50, 100]", shadow=SHADOW_PHASE)
    target = MemoryTarget(EXAMPLE)
    source = ScriptedSource(target, readings())
    source.shadow_fixed = shadow_readings(mismatches=3)
    clock = iter(range(0, 10_000, 5))
    assert Rollout(s, target, source, clock=lambda: float(next(clock))).run(threading.Event()) == 3
    config = load_config_text(target.text)
    assert current_percent(config, s.rule, "pod") == 0
    assert find_rule(config, {"userAgent": "kubelet/*"}).shadow is None  # put back: none
    state = RolloutState.from_json(target.state)
    assert state.phase == "RolledBack" and state.shadow == "failed"
    assert "mismatch ratio 3.00% > 1.00%" in state.reason
    assert target.events[-1][:2] == (True, "RolloutShadowFailed")


def test_a_shadow_is_set_and_removed_on_any_layout():
    block = EXAMPLE.replace(
        '  - match: {userAgent: "kube-controller-manager/*"}',
        '  - match:\n      userAgent: "kubelet/*"\n    percent: {pod: 5}\n'
        '  - match: {userAgent: "kube-controller-manager/*"}',
    )
    shadow = {"group": "pod", "percent": 5, "maxPerSecond": 50}
    for text, match in ((block, {"userAgent": "kubelet/*"}), (EXAMPLE, {"userAgent": "new/*"})):
        on = set_shadow(text, match, shadow, "pod")  # a round trip; a rule appended
        rule = find_rule(load_config_text(on), match)
        assert rule.shadow == ShadowSpec("pod", 5.0, 50.0)
        off = find_rule(load_config_text(set_shadow(on, match, None, "pod")), match)
        assert off.shadow is None and off.percent == rule.percent


def test_a_rules_own_shadow_is_put_back_after_the_phase():
    import threading

    from kom_gateway.rollout.runner import Rollout

    own = EXAMPLE.replace(
        '  - match: {userAgent: "kube-controller-manager/*"}',
        '  - match: {userAgent: "kubelet/*"}\n    percent: {pod: 0}\n'
        "    shadow: {group: pod, percent: 1, maxPerSecond: 2}\n"
        '  - match: {userAgent: "kube-controller-manager/*"}',
    )
    s = spec(hold="1s", steps="[50]", shadow=SHADOW_PHASE)
    target = MemoryTarget(own)
    source = ScriptedSource(target, readings())
    source.shadow_fixed = shadow_readings()
    clock = iter(range(0, 10_000, 5))
    assert Rollout(s, target, source, clock=lambda: float(next(clock))).run(threading.Event()) == 0
    rule = find_rule(load_config_text(target.text), {"userAgent": "kubelet/*"})
    assert rule.shadow == ShadowSpec("pod", 1.0, 2.0)
