"""Claims, globs, cut-over buckets and the routing decision (no sockets)."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kom_gateway.kube.identity import parse_x509_identity, x509_identity
from kom_gateway.kube.requestinfo import parse_request
from kom_gateway.routing import (
    Client,
    CutoverRule,
    Glob,
    Match,
    ResourceClaim,
    Router,
    bucket_of,
    parse_claim,
)
from kom_gateway.routing.cutover import user_agent_product
from kom_gateway.routing.router import (
    REASON_CUT_OVER,
    REASON_HOME_IS_DEFAULT,
    REASON_NO_RULE,
    REASON_NOT_CUT_OVER,
)

KUBELET_UA = "kubelet/v1.31.0 (linux/amd64) kubernetes/6911225"


# -- claims -------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "claim"),
    [
        ("pods", ResourceClaim("", "pods", "")),
        ("pods/log", ResourceClaim("", "pods", "log")),
        ("leases.coordination.k8s.io", ResourceClaim("coordination.k8s.io", "leases", "")),
        ("events.events.k8s.io", ResourceClaim("events.k8s.io", "events", "")),
        ("deployments.apps/scale", ResourceClaim("apps", "deployments", "scale")),
        ("*.rbac.authorization.k8s.io", ResourceClaim("rbac.authorization.k8s.io", "*", "")),
        ("*", ResourceClaim("", "*", "")),
    ],
)
def test_parse_claim(text, claim):
    assert parse_claim(text) == claim
    assert str(claim) == text


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty"),
        ("Pods", "did you mean 'pods'"),
        ("pod s", "bad resource"),
        ("pods/", "bad subresource"),
        ("pods/Log", "bad subresource"),
        ("*.apps/scale", "takes no subresource"),
        ("deployments.apps/v1", None),  # 'v1' is a syntactically valid subresource
        ("leases.coordination.k8s.io.", "bad API group"),
        ("deployments.Apps", "bad API group"),
        ("apps/v1/deployments", "bad subresource"),
    ],
)
def test_bad_claims(text, message):
    if message is None:
        parse_claim(text)
        return
    with pytest.raises(ValueError, match=message):
        parse_claim(text)


def _router(rules=()):
    claims = [
        (parse_claim("pods"), "pod"),
        (parse_claim("bindings"), "pod"),
        (parse_claim("pods/log"), "default"),
        (parse_claim("events"), "event"),
        (parse_claim("events.events.k8s.io"), "event"),
        (parse_claim("nodes"), "config"),
        (parse_claim("leases.coordination.k8s.io"), "config"),
        (parse_claim("*.rbac.authorization.k8s.io"), "config"),
        (parse_claim("roles.rbac.authorization.k8s.io"), "pod"),
    ]
    return Router(claims, rules)


@pytest.mark.parametrize(
    ("method", "target", "home"),
    [
        ("GET", "/api/v1/pods?watch=1", "pod"),
        ("GET", "/api/v1/namespaces/ns/pods/p/status", "pod"),  # resource entry covers subresources
        ("GET", "/api/v1/namespaces/ns/pods/p/log", "default"),  # more specific entry wins
        ("POST", "/api/v1/namespaces/ns/bindings", "pod"),
        ("POST", "/api/v1/namespaces/ns/events", "event"),
        ("POST", "/apis/events.k8s.io/v1/namespaces/ns/events", "event"),
        ("GET", "/apis/example.com/v1/events", "default"),  # events of another group
        ("PUT", "/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/n1", "config"),
        ("GET", "/apis/rbac.authorization.k8s.io/v1/clusterroles", "config"),  # *.group
        ("GET", "/apis/rbac.authorization.k8s.io/v1/namespaces/ns/roles", "pod"),  # resource beats *.group
        ("PATCH", "/api/v1/nodes/n1/status", "config"),
        ("GET", "/api/v1/configmaps", "default"),
        ("GET", "/apis/apps/v1/deployments", "default"),
        ("GET", "/api/v1", "default"),
        ("GET", "/healthz", "default"),
        ("GET", "/api/v1/watch", "default"),  # malformed
        ("GET", "/api/v1/pods/%zz", "default"),
    ],
)
def test_home_group(method, target, home):
    assert _router().decide(parse_request(method, target), Client()).home == home


# -- globs --------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("pattern", "text", "matches"),
    [
        ("kubelet/*", KUBELET_UA, True),
        ("kubelet/*", "kubelet", False),
        ("kubelet*", "kubelet", True),
        ("kube-scheduler/*", KUBELET_UA, False),
        ("*", "", True),
        ("system:node:*", "system:node:n1", True),
        ("system:node:?", "system:node:n1", False),
        ("system:node:n?", "system:node:n1", True),
        ("n[0-9]", "n7", True),
        ("n[!0-9]", "n7", False),
        ("n[]]", "n]", True),
        ("a\\*b", "a*b", True),
        ("a\\*b", "axb", False),
        ("a.b", "axb", False),  # no regex leaks
        ("KUBELET/*", KUBELET_UA, False),  # case-sensitive
    ],
)
def test_glob(pattern, text, matches):
    assert Glob(pattern).matches(text) is matches


@pytest.mark.parametrize("pattern", ["", "kubelet[", "a\\", "[z-a]", "[!"])
def test_bad_glob(pattern):
    with pytest.raises(ValueError):
        Glob(pattern)


@given(st.text(max_size=20))
def test_glob_never_crashes_compiling(pattern):
    try:
        glob = Glob(pattern)
    except ValueError:
        return
    glob.matches(pattern)


# -- clients and buckets ------------------------------------------------------------
def test_x509_identity_round_trip():
    identity = x509_identity("system:node:n1", ("system:nodes", "extra"))
    assert identity == "x509:CN=system:node:n1,O=system:nodes,O=extra"
    assert parse_x509_identity(identity) == ("system:node:n1", ("system:nodes", "extra"))
    assert parse_x509_identity("token:abc") is None


def test_user_agent_product():
    assert user_agent_product(KUBELET_UA) == "kubelet"
    assert user_agent_product("kubectl") == "kubectl"
    assert user_agent_product("my operator v2") == "my"
    assert user_agent_product("") == ""


def test_client_key_prefers_identity_and_ignores_version():
    a = Client(KUBELET_UA, identity="x509:CN=system:node:n1", remote_addr="10.1.1.1")
    b = Client("kubelet/v1.32.1 (linux/arm64) kubernetes/zzz", identity="x509:CN=system:node:n1")
    assert a.key == b.key == "x509:CN=system:node:n1|kubelet"
    assert a.bucket == b.bucket
    assert Client(KUBELET_UA, remote_addr="10.1.1.1").key == "addr:10.1.1.1|kubelet"
    assert Client("kubectl/v1").key == "anonymous|kubectl"
    # same identity, another program: another client
    assert Client("kube-proxy/v1", identity="x509:CN=system:node:n1").key != a.key


@given(st.text(max_size=50))
def test_bucket_range(key):
    assert 0.0 <= bucket_of(key) < 100.0


def test_buckets_spread_evenly():
    buckets = [bucket_of(f"x509:CN=system:node:node-{i}|kubelet") for i in range(20000)]
    for percent in (1, 10, 25, 50, 90):
        share = sum(b < percent for b in buckets) / len(buckets) * 100
        assert abs(share - percent) < 1.5, (percent, share)


# -- the decision -------------------------------------------------------------------
def _rules(kubelet_pod_percent=25.0):
    return [
        CutoverRule(0, Match(user_agent=Glob("kube-scheduler/*")), {"pod": 100.0}),
        CutoverRule(
            1,
            Match(user_agent=Glob("kubelet/*"), user_group=Glob("system:nodes")),
            {"pod": kubelet_pod_percent, "config": 100.0, "event": 100.0},
        ),
        CutoverRule(2, Match(user=Glob("system:serviceaccount:kube-system:*")), {"event": 100.0}),
    ]


def _kubelet(i):
    return Client(KUBELET_UA, identity=f"x509:CN=system:node:n{i}", user=f"system:node:n{i}",
                  groups=("system:nodes", "system:authenticated"))


def test_decision_reasons():
    rules = _rules()
    router = _router(rules)
    pods = parse_request("GET", "/api/v1/pods?watch=1")
    cm = parse_request("GET", "/api/v1/configmaps")
    node = parse_request("GET", "/api/v1/nodes/n1")
    sched = Client("kube-scheduler/v1.31.0", identity="x509:CN=system:kube-scheduler")
    assert router.decide(cm, sched).reason == REASON_HOME_IS_DEFAULT
    assert router.decide(pods, sched) == ("pod", "pod", REASON_CUT_OVER, rules[0], 100.0)
    assert router.decide(node, sched) == ("config", "default", REASON_NOT_CUT_OVER, rules[0], 0.0)
    assert router.decide(pods, Client("kubectl/v1.31")) == ("pod", "default", REASON_NO_RULE, None, None)
    assert router.decide(node, _kubelet(1)) == ("config", "config", REASON_CUT_OVER, rules[1], 100.0)
    assert rules[1].label == "userAgent=kubelet/* userGroup=system:nodes"
    # the userGroup must match too: a kubelet UA without the node group is not rule 1
    impostor = Client(KUBELET_UA, identity="token:abc")
    assert router.decide(node, impostor).reason == REASON_NO_RULE
    sa = Client("my-operator/v2", identity="token:x", user="system:serviceaccount:kube-system:op")
    assert router.decide(parse_request("POST", "/api/v1/namespaces/a/events"), sa).target == "event"


def test_first_matching_rule_wins():
    rules = [
        CutoverRule(0, Match(user_agent=Glob("kubelet/*")), {}),
        CutoverRule(1, Match(), {"pod": 100.0}),
    ]
    router = _router(rules)
    pods = parse_request("GET", "/api/v1/pods")
    assert router.decide(pods, _kubelet(1)) == ("pod", "default", REASON_NOT_CUT_OVER, rules[0], 0.0)
    assert router.decide(pods, Client("kubectl/v1")).target == "pod"  # empty match = everyone


def test_percent_cutover_share_and_stability():
    router = _router(_rules(25.0))
    pods = parse_request("GET", "/api/v1/pods")
    moved = [router.decide(pods, _kubelet(i)).target == "pod" for i in range(4000)]
    assert abs(sum(moved) / len(moved) - 0.25) < 0.03
    again = [router.decide(pods, _kubelet(i)).target == "pod" for i in range(4000)]
    assert moved == again  # the same client always gets the same answer


@given(st.floats(0, 100), st.floats(0, 100))
def test_raising_a_percent_only_moves_clients_to_the_group(p1, p2):
    low, high = sorted((p1, p2))
    pods = parse_request("GET", "/api/v1/pods")
    at_low = _router(_rules(low))
    at_high = _router(_rules(high))
    for i in range(200):
        client = _kubelet(i)
        if at_low.decide(pods, client).target == "pod":
            assert at_high.decide(pods, client).target == "pod"


def test_zero_and_hundred_percent_are_absolute():
    pods = parse_request("GET", "/api/v1/pods")
    assert all(_router(_rules(0.0)).decide(pods, _kubelet(i)).target == "default" for i in range(500))
    assert all(_router(_rules(100.0)).decide(pods, _kubelet(i)).target == "pod" for i in range(500))
