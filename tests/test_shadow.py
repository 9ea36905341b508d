"""Shadow reads: the summary, the exact question and the verdict (pure, fed by the
simulator's own answers), the budgets, the config key, and the whole path in process:
a healthy candidate matches, a diverging one is caught with the right reason, and a
down or slow one costs the clients nothing."""

import asyncio
import copy
import gzip
import json

import pytest
from harness import Stack

from kom_gateway.config import ConfigError, load_config_text
from kom_gateway.kube.requestinfo import parse_request
from kom_gateway.routing.cutover import ShadowSpec
from kom_gateway.shadow.compare import (
    CONTENT,
    ERROR,
    EXTRA,
    MATCH,
    MISMATCH,
    MISSING,
    SKIPPED,
    STATUS,
    TOO_OLD,
    Verdict,
    candidate_target,
    judge,
)
from kom_gateway.shadow.gate import ShadowGate
from kom_gateway.shadow.summary import Summary, SummaryBuilder
from kom_gateway.sim import resources
from kom_gateway.sim.api import Reply, SimAPI, SimRequest
from kom_gateway.sim.faults import Faults
from kom_gateway.sim.store import ApiError, Store

PODS = resources.BY_GROUP_RESOURCE[("", "pods")]
JSON_HEADERS = [(b"content-type", b"application/json")]


def pod(name: str, **labels: str) -> dict:
    return {"metadata": {"name": name, "labels": labels},
            "spec": {"containers": [{"name": "c", "image": "x"}]}}


def store_with_pods(count: int = 5) -> Store:
    store = Store()
    for i in range(count):
        store.create(PODS, "default", pod(f"p{i}"))
    return store


def ask(api: SimAPI, target: str, faults: Faults | None = None) -> Reply:
    reply = api.handle(SimRequest("GET", target, {}), parse_request("GET", target), faults)
    assert isinstance(reply, Reply)
    return reply


def summarise(verb: str, reply: Reply, chunk: int = 0, gzipped: bool = False) -> Summary:
    body = gzip.compress(reply.body) if gzipped else reply.body
    headers = [(b"content-type", reply.content_type.encode())]
    if gzipped:
        headers.append((b"content-encoding", b"gzip"))
    builder = SummaryBuilder(verb == "list")
    builder.response(reply.status, headers)
    step = chunk or len(body) or 1
    for i in range(0, len(body), step):
        builder.feed(body[i : i + step])
    return builder.finish()


def shadow_of(api: SimAPI, verb: str, target: str, faults: Faults) -> Verdict:
    """The whole exchange without sockets: default's answer, the exact question, the
    candidate's answer (with `faults`), the verdict."""
    default = summarise(verb, ask(api, target))
    question = candidate_target(target, verb, default)
    if isinstance(question, Verdict):
        return question
    return judge(verb, default, summarise(verb, ask(api, question, faults)))


# -- the summary --------------------------------------------------------------------------
@pytest.mark.parametrize("chunk", [1, 7, 64, 0])
@pytest.mark.parametrize("gzipped", [False, True])
def test_a_list_summary_is_the_same_however_its_body_is_cut_or_encoded(chunk, gzipped):
    api = SimAPI(store_with_pods(4))
    reply = ask(api, "/api/v1/pods")
    whole = summarise("list", reply)
    cut = summarise("list", reply, chunk, gzipped)
    assert (cut.items, cut.resource_version, cut.item_keys, cut.item_versions, cut.body_digest) == (
        whole.items, whole.resource_version, whole.item_keys, whole.item_versions,
        whole.body_digest)
    assert whole.items == 4 and whole.resource_version == str(api.store.rv)
    assert not whole.unreadable


def test_an_object_summary_has_its_uid_and_resource_version():
    api = SimAPI(store_with_pods(1))
    obj = json.loads(ask(api, "/api/v1/namespaces/default/pods/p0").body)
    s = summarise("get", ask(api, "/api/v1/namespaces/default/pods/p0"), chunk=5)
    assert (s.uid, s.resource_version) == (obj["metadata"]["uid"], obj["metadata"]["resourceVersion"])


def test_a_too_large_resource_version_status_is_recognised():
    api = SimAPI(store_with_pods(1))
    s = summarise("list", ask(api, f"/api/v1/pods?resourceVersion={api.store.rv + 5}"
                                   "&resourceVersionMatch=Exact"))
    assert s.status == 504 and s.too_large_rv


def test_malformed_json_is_unreadable_not_an_exception():
    builder = SummaryBuilder(True)
    builder.response(200, JSON_HEADERS)
    builder.feed(b'{"metadata":{"resourceVersion":"5"},"items":[{"metadata":')
    builder.feed(b"}}}}]")
    assert builder.finish().unreadable


# -- protobuf (kubelets, controllers) ---------------------------------------------------------
# Kubernetes' wire format built by hand (varints and length-delimited fields), as
# k8s.io/apimachinery's protobuf serializer writes it: magic, then runtime.Unknown.
def varint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def pb(number: int, payload: bytes | str) -> bytes:
    payload = payload.encode() if isinstance(payload, str) else payload
    return varint(number << 3 | 2) + varint(len(payload)) + payload


def pb_object(name: str, ns: str, uid: str, rv: str, spec: int = 16) -> bytes:
    meta = (pb(1, name) + pb(3, ns) + pb(5, uid) + pb(6, rv) + varint(7 << 3) + varint(3)
            + pb(12, pb(1, "note") + pb(2, "x" * 300)) + pb(17, b"m" * 2000))  # fmt: skip
    return pb(1, meta) + pb(2, b"s" * spec) + pb(3, b"t" * 10)


def pb_body(raw: bytes, kind: str) -> bytes:
    return (b"k8s\x00" + pb(1, pb(1, "v1") + pb(2, kind)) + pb(2, raw) + pb(3, "")
            + pb(4, "application/vnd.kubernetes.protobuf"))  # fmt: skip


ITEMS = [("default", f"p{i}", f"uid-{i}", str(100 + i)) for i in range(4)]


def pb_list(rv: str, items=ITEMS, spec: int = 16) -> bytes:
    raw = pb(1, pb(2, rv) + pb(3, "")) + b"".join(
        pb(2, pb_object(name, ns, uid, item_rv, spec)) for ns, name, uid, item_rv in items)
    return pb_body(raw, "PodList")


def pb_summary(verb: str, body: bytes, chunk: int = 0) -> Summary:
    builder = SummaryBuilder(verb == "list")
    builder.response(200, [(b"content-type", b"application/vnd.kubernetes.protobuf")])
    step = chunk or len(body)
    for i in range(0, len(body), step):
        builder.feed(body[i : i + step])
    return builder.finish()


@pytest.mark.parametrize("chunk", [1, 7, 4096, 0])
def test_a_protobuf_list_reads_as_the_same_list_in_json(chunk):
    as_json = {"kind": "PodList", "metadata": {"resourceVersion": "200"}, "items": [
        {"metadata": {"namespace": ns, "name": name, "uid": uid, "resourceVersion": rv}}
        for ns, name, uid, rv in ITEMS]}  # fmt: skip
    j = summarise("list", Reply(200, json.dumps(as_json).encode()))
    p = pb_summary("list", pb_list("200", spec=70000), chunk)  # items larger than a read
    assert not p.unreadable and p.encoding == "protobuf"
    assert (p.resource_version, p.items, p.item_keys, p.item_versions) == (
        j.resource_version, j.items, j.item_keys, j.item_versions)


def test_a_protobuf_object_and_its_verdicts():
    body = pb_body(pb_object("p1", "default", "uid-1", "101"), "Pod")
    d = pb_summary("get", body, 5)
    assert (d.uid, d.resource_version) == ("uid-1", "101")
    assert candidate_target("/api/v1/namespaces/default/pods/p1", "get", d) == (
        "/api/v1/namespaces/default/pods/p1?resourceVersion=101")
    assert judge("get", d, pb_summary("get", body)) == Verdict(MATCH, "")
    changed = pb_body(pb_object("p1", "default", "uid-1", "101", spec=17), "Pod")
    assert judge("get", d, pb_summary("get", changed)) == Verdict(MISMATCH, CONTENT)
    lists = pb_summary("list", pb_list("200"))
    assert judge("list", lists, pb_summary("list", pb_list("200", ITEMS[:3]))) == Verdict(
        MISMATCH, MISSING)
    assert judge("list", lists, pb_summary("list", pb_list("199"))) == Verdict(MISMATCH, TOO_OLD)


@pytest.mark.parametrize("body", [pb_list("200")[:-30], b"k8s\x01" + pb_list("1")[4:],
                                  b"k8s\x00\x0f\xff"])  # fmt: skip
def test_a_broken_protobuf_body_is_unreadable_not_an_exception(body):
    assert pb_summary("list", body, 3).unreadable


# -- the exact question -------------------------------------------------------------------
def test_a_list_is_asked_at_defaults_resource_version_exactly():
    s = Summary()
    s.status, s.encoding, s.resource_version = 200, "json", "1234"
    target = "/api/v1/pods?labelSelector=a%3Db&resourceVersion=0&resourceVersionMatch=NotOlderThan"
    assert candidate_target(target, "list", s) == (
        "/api/v1/pods?labelSelector=a%3Db&resourceVersion=1234&resourceVersionMatch=Exact")
    assert candidate_target("/api/v1/pods?limit=500&continue=abc", "list", s) == (
        "/api/v1/pods?limit=500&continue=abc")  # the token pins the resourceVersion
    assert candidate_target("/api/v1/namespaces/a/pods/p", "get", s) == (
        "/api/v1/namespaces/a/pods/p?resourceVersion=1234")
    s.status = 404
    assert candidate_target("/api/v1/namespaces/a/pods/p", "get", s) == "/api/v1/namespaces/a/pods/p"


def test_a_body_without_a_readable_resource_version_is_skipped():
    s = Summary()
    s.status, s.encoding = 200, ""  # e.g. CBOR
    assert candidate_target("/api/v1/pods", "list", s) == Verdict(SKIPPED, "encoding")
    s.encoding = "json"
    assert candidate_target("/api/v1/pods", "list", s) == Verdict(SKIPPED, "no-resource-version")


# -- verdicts, on the simulator's own answers ------------------------------------------------
LIST, GET = "/api/v1/namespaces/default/pods", "/api/v1/namespaces/default/pods/p2"


@pytest.mark.parametrize(("faults", "verb", "target", "expected"), [
    ({}, "list", LIST, Verdict(MATCH, "")),
    ({}, "get", GET, Verdict(MATCH, "")),
    ({}, "get", "/api/v1/namespaces/default/pods/nope", Verdict(MATCH, "")),
    ({"diverge": "content"}, "list", LIST, Verdict(MISMATCH, CONTENT)),
    ({"diverge": "content"}, "get", GET, Verdict(MISMATCH, CONTENT)),
    ({"diverge": "missing"}, "list", LIST, Verdict(MISMATCH, MISSING)),
    ({"diverge": "extra"}, "list", LIST, Verdict(MISMATCH, EXTRA)),
    ({"stale_by": 2}, "list", LIST, Verdict(MISMATCH, TOO_OLD)),
    ({"stale_by": 2}, "get", GET, Verdict(MATCH, "")),  # it has seen p2's version
    ({"stale_by": 2}, "get", GET.replace("p2", "p4"), Verdict(MISMATCH, TOO_OLD)),
    ({"lacks_resource": "pods"}, "list", LIST, Verdict(MISMATCH, STATUS)),
    ({"lacks_resource": "pods"}, "get", GET, Verdict(MISMATCH, MISSING)),
    ({"status_override": 500}, "list", LIST, Verdict(MATCH, "")),  # (a server.py fault)
])
def test_each_divergence_is_found_with_its_reason(faults, verb, target, expected):
    api = SimAPI(store_with_pods(5))
    f = Faults()
    f.update(faults)
    assert shadow_of(api, verb, target, f) == expected


def test_a_list_at_an_older_resource_version_is_answered_as_it_was_then():
    store = store_with_pods(3)
    api = SimAPI(store)
    before = summarise("list", ask(api, LIST))
    store.delete(PODS, "default", "p0")
    obj = copy.deepcopy(store.get(PODS, "default", "p1"))
    obj["metadata"]["labels"] = {"changed": "yes"}
    store.update(PODS, "default", "p1", obj)
    store.create(PODS, "default", pod("p9"))
    question = candidate_target(LIST, "list", before)
    assert judge("list", before, summarise("list", ask(api, question))) == Verdict(MATCH, "")
    assert judge("list", before, summarise("list", ask(api, LIST))).result == MISMATCH


def test_a_get_answered_newer_than_default_is_a_match_older_is_too_old():
    d, c = Summary(), Summary()
    for s in (d, c):
        s.status, s.encoding, s.uid = 200, "json", "u"
    d.resource_version, c.resource_version = "10", "12"
    assert judge("get", d, c) == Verdict(MATCH, "")  # it changed in between
    d.resource_version, c.resource_version = "12", "10"
    assert judge("get", d, c) == Verdict(MISMATCH, TOO_OLD)
    c.status = 503
    assert judge("get", d, c) == Verdict(ERROR, "5xx")


# -- the simulator's history and ListOptions ---------------------------------------------------
def test_reads_beyond_the_history_or_ahead_of_it_fail_as_kube_apiserver_does():
    store = Store(history=5)
    for i in range(10):
        store.create(PODS, "default", pod(f"p{i}"))
    with pytest.raises(ApiError) as old:
        store.check_rv(store.rv - 8)
    assert old.value.code == 410
    with pytest.raises(ApiError) as ahead:
        store.check_rv(store.rv + 1)
    assert ahead.value.code == 504 and ahead.value.details["causes"][0]["reason"] == (
        "ResourceVersionTooLarge")


@pytest.mark.parametrize("query", [
    "resourceVersionMatch=Exact",
    "resourceVersion=0&resourceVersionMatch=Exact",
    "resourceVersion=5&resourceVersionMatch=Sometime",
    "resourceVersion=5&resourceVersionMatch=Exact&continue=x",
    "watch=true&resourceVersion=5&resourceVersionMatch=NotOlderThan",
    "watch=true&sendInitialEvents=true",
    "sendInitialEvents=true&resourceVersionMatch=NotOlderThan&resourceVersion=0",
])
def test_invalid_list_options_are_422(query):
    api = SimAPI(Store())
    target = f"/api/v1/pods?{query}"
    reply = api.handle(SimRequest("GET", target, {}), parse_request("GET", target))
    assert reply.status == 422 and (b"Forbidden" in reply.body or b"Unsupported" in reply.body)


def test_a_watch_list_request_is_valid():
    api = SimAPI(Store())
    target = "/api/v1/pods?watch=true&sendInitialEvents=true&resourceVersionMatch=NotOlderThan"
    assert not isinstance(api.handle(SimRequest("GET", target, {}), parse_request("GET", target)), Reply)


# -- budgets ---------------------------------------------------------------------------------
def test_the_gate_samples_and_keeps_every_budget():
    gate = ShadowGate(ShadowSpec("pod", 50.0, 2.0), now=0.0)
    assert gate.sampled(0.49) and not gate.sampled(0.5)
    assert gate.admit(0.0, load=0.95, candidate_up=True) == "load"
    assert gate.admit(0.0, load=0.0, candidate_up=False) == "ejected"
    assert gate.admit(0.0, 0.0, True) == "" and gate.admit(0.0, 0.0, True) == ""
    assert gate.admit(0.0, 0.0, True) == "in-flight"  # at most a second's budget at once
    gate.release()
    assert gate.admit(0.1, 0.0, True) == "budget"  # 2 per second
    assert gate.admit(0.6, 0.0, True) == ""


# -- the config key --------------------------------------------------------------------------
BASE = """groups:
  default: {endpoints: ["http://127.0.0.1:1"]}
  pod: {endpoints: ["http://127.0.0.1:2"], resources: [pods]}
cutover:
  - match: {userAgent: "kubelet/*"}
    percent: {pod: 10}
"""


def test_shadow_is_read_with_its_defaults():
    rule = load_config_text(BASE + "    shadow: {group: pod}\n").cutover[0]
    assert rule.shadow == ShadowSpec("pod", 1.0, 10.0)
    rule = load_config_text(BASE + "    shadow: {group: pod, percent: 5, maxPerSecond: 50}\n").cutover[0]
    assert rule.shadow == ShadowSpec("pod", 5.0, 50.0)


@pytest.mark.parametrize(("shadow", "message"), [
    ("{group: default}", "must name the candidate group"),
    ("{group: nope}", "must name the candidate group"),
    ("{group: pod, percent: 101}", "must be at most 100"),
    ("{group: pod, maxPerSecond: -1}", "must be a positive number"),
    ("{group: pod, sample: 3}", "sample"),
    ("[pod]", "shadow"),
])
def test_a_wrong_shadow_is_refused_with_its_key(shadow, message):
    with pytest.raises(ConfigError) as exc:
        load_config_text(BASE + f"    shadow: {shadow}\n")
    assert message in exc.value.render() and "shadow" in exc.value.render()


# -- in process: gateway, simulated groups -----------------------------------------------------
RULE = "userAgent=kubectl/*"
SHADOWED = """cutover:
  - match: {userAgent: "kubectl/*"}
    percent: {pod: 0}
    shadow: {group: pod, percent: 100, maxPerSecond: 1000}
"""


def shadow_count(s: Stack, result: str, reason: str = "") -> float:
    m = s.gateway.metrics
    m.flush()
    return m.shadow_requests.labels(RULE, "pod", result, reason)._value.get()


def candidate_reads(s: Stack) -> list[str]:
    """What the candidate group was asked (not its health probes)."""
    return [e["target"] for e in s.sim.requests if e["group"] == "pod" and e["target"] != "/readyz"]


async def until(predicate, seconds: float = 10) -> None:
    async with asyncio.timeout(seconds):
        while not predicate():
            await asyncio.sleep(0.02)


async def started(extra: str = "") -> Stack:
    s = await Stack().start(cutover=SHADOWED, extra=extra)
    c = await s.client()
    for i in range(3):
        body = json.dumps(pod(f"p{i}")).encode()
        assert (await c.request("POST", "/api/v1/namespaces/default/pods", body=body)).status == 201
    return s


async def default_answers(s: Stack, faults: dict[str, object], reads: int = 3) -> list:
    """The candidate group given `faults`, then `reads` pod LISTs: each one must be
    answered by default (what the client gets never depends on the candidate)."""
    s.sim.groups["pod"].faults.update(faults)
    answers = []
    for _ in range(reads):
        r = await s.clients[0].request("GET", "/api/v1/namespaces/default/pods")
        assert r.status == 200 and r.group == "default"
        answers.append(r)
    return answers


@pytest.mark.usefixtures("engine")
async def test_a_healthy_candidate_matches_and_clients_get_defaults_answers():
    s = await started()
    try:
        c = s.clients[0]
        for _ in range(5):
            r = await c.request("GET", "/api/v1/namespaces/default/pods")
            assert r.status == 200 and r.group == "default" and len(r.json()["items"]) == 3
            r = await c.request("GET", "/api/v1/namespaces/default/pods/p1")
            assert r.status == 200 and r.group == "default"
        await until(lambda: shadow_count(s, MATCH) == 10)
        assert shadow_count(s, MISMATCH, CONTENT) == 0
        asked = candidate_reads(s)
        assert any("resourceVersionMatch=Exact" in t for t in asked)
        assert any(t.startswith("/api/v1/namespaces/default/pods/p1?resourceVersion=") for t in asked)
        m = s.gateway.metrics
        assert m.shadow_duration.labels("pod")._sum.get() > 0
        assert m.shadow_default_duration.labels("pod")._sum.get() > 0
        # writes and other rules' clients are never shadowed
        before = len(asked)
        await c.request("GET", "/api/v1/namespaces/default/pods", user_agent="other/1")
        await asyncio.sleep(0.1)
        assert len(candidate_reads(s)) == before
    finally:
        await s.close()


@pytest.mark.parametrize(("faults", "reason"), [
    ({"diverge": "content"}, CONTENT),
    ({"diverge": "missing"}, MISSING),
    ({"stale_by": 1}, TOO_OLD),
    ({"lacks_resource": "pods"}, STATUS),
])
async def test_a_diverging_candidate_is_caught_and_clients_still_get_defaults_answer(
    faults, reason, caplog
):
    s = await started()
    try:
        for r in await default_answers(s, faults):
            assert [p["metadata"]["name"] for p in r.json()["items"]] == ["p0", "p1", "p2"]
            assert "sim.kom-gateway.io/diverged" not in r.body.decode()
        await until(lambda: shadow_count(s, MISMATCH, reason) == 3)
        assert shadow_count(s, MATCH) == 0
        assert f"shadow read mismatch ({reason}): rule {RULE}" in caplog.text
    finally:
        await s.close()


async def test_a_down_candidate_is_skipped_and_costs_clients_nothing():
    s = await started("health: {intervalSeconds: 0.1, timeoutSeconds: 0.3, failureThreshold: 1}\n")
    try:
        c = s.clients[0]
        await s.sim.set_down("pod", True)
        await until(lambda: not s.gateway.upstreams.groups["pod"][0].healthy)
        for _ in range(4):
            assert (await c.request("GET", "/api/v1/namespaces/default/pods")).status == 200
        assert shadow_count(s, SKIPPED, "ejected") == 4
    finally:
        await s.close()


async def test_a_slow_candidate_times_out_off_the_clients_path():
    s = await started("timeouts: {requestSeconds: 1}\n")
    try:
        c = s.clients[0]
        s.sim.groups["pod"].faults.update({"latency": 3})
        loop = asyncio.get_running_loop()
        start = loop.time()
        for _ in range(3):
            assert (await c.request("GET", "/api/v1/namespaces/default/pods")).status == 200
        assert loop.time() - start < 1.0  # default's latency, not the candidate's
        await until(lambda: shadow_count(s, ERROR, "timeout") == 3, 5)
        assert len(s.gateway.shadows.live) == 0
    finally:
        await s.close()


@pytest.mark.parametrize(("faults", "result", "reason"), [
    ({"status_override": 503}, ERROR, "5xx"),
    ({"reset_before_headers": True}, ERROR, "reset"),
    ({"refuse_streams": True}, SKIPPED, "refused"),  # not processed: not the group's answer
])
async def test_a_failing_candidate_is_an_error_and_an_unprocessed_read_a_skip(faults, result, reason):
    s = await started("health: {consecutiveFailures: 1000}\n")
    try:
        await default_answers(s, faults)
        await until(lambda: shadow_count(s, result, reason) == 3)
        assert shadow_count(s, MATCH) == shadow_count(s, MISMATCH, STATUS) == 0
    finally:
        await s.close()


async def test_a_slow_candidate_cannot_pile_shadow_reads_up():
    """At most a second's budget in flight: past it, reads are skipped and counted."""
    s = await Stack().start(cutover=SHADOWED.replace("maxPerSecond: 1000", "maxPerSecond: 2"))
    try:
        c = await s.client()
        s.sim.groups["pod"].faults.update({"latency": 2})
        for _ in range(2):  # two shadows wait on the slow candidate: the budget, spent
            assert (await c.request("GET", "/api/v1/namespaces/default/pods")).status == 200
        assert len(s.gateway.shadows.live) == 2
        for _ in range(3):  # default's answers, at once; their shadows given up
            assert (await c.request("GET", "/api/v1/namespaces/default/pods")).status == 200
        assert shadow_count(s, SKIPPED, "in-flight") == 3
        await until(lambda: shadow_count(s, MATCH) == 2, 5)
    finally:
        await s.close()
