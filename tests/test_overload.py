"""Overload cores, without sockets: Retry-After, token buckets, admission, load and
GOAWAY chance, and the YAML that configures them."""

import textwrap

import pytest

from kom_gateway.config import ConfigError, load_config_text
from kom_gateway.http.serverconn import connection_deadline
from kom_gateway.kube.requestinfo import parse_request
from kom_gateway.overload.admission import Admission, Rejection, Ticket
from kom_gateway.overload.clientshare import ClientBuffers
from kom_gateway.overload.load import (
    GoawayPolicy,
    LoadMeter,
    goaway_chance,
)
from kom_gateway.overload.policy import (
    ClientLimits,
    GroupLimits,
    OverloadPolicy,
    RateLimitRule,
    RequestMatch,
)
from kom_gateway.overload.ratelimit import BucketSet, whole_seconds
from kom_gateway.overload.retryafter import RetryAfter
from kom_gateway.routing.claims import parse_claim
from kom_gateway.routing.cutover import Client, Match
from kom_gateway.routing.glob import Glob
from kom_gateway.tokenbucket import TokenBucket


def node(n: int, agent: str = "kubelet/v1.31.0") -> Client:
    """Node n's kubelet: its verified certificate identity."""
    return Client(agent, f"x509:CN=system:node:n{n},O=system:nodes", "10.0.0.1",
                  f"system:node:n{n}", ("system:nodes",))  # fmt: skip


def lease_of(n: int):
    return parse_request(
        "PUT", f"/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/n{n}"
    )


KUBELET = node(1)
OPERATOR = Client("my-operator/v2", "token:abc", "10.0.0.2")
ADMIN = Client("kubectl/v1.31", "x509:CN=admin,O=system:masters", "10.0.0.3", "admin",
               ("system:masters",))  # fmt: skip

LIST_PODS = parse_request("GET", "/api/v1/pods")
WATCH_PODS = parse_request("GET", "/api/v1/pods?watch=1")
LEASE_UPDATE = lease_of(1)
LOGS = parse_request("GET", "/api/v1/namespaces/a/pods/p/log?follow=true")


# -- Retry-After -------------------------------------------------------------------------
def test_retry_after_doubles_under_sustained_shedding_up_to_the_cap_then_shrinks():
    tracker = RetryAfter(1, 32)
    seen = []
    for second in range(40):
        for i in range(100):  # far above 3 x value every second
            value = tracker.shed(second + i / 100)
        seen.append(value)
    assert seen[0] == 1
    assert seen == sorted(seen)  # never shrinks while overload persists
    assert set(seen) == {1, 2, 4, 8, 16, 32}
    assert seen[-1] == 32
    # quiet: one down per second, back at the floor within 32 s
    assert tracker.current(41) == 31
    assert tracker.current(45) == 27
    assert tracker.current(100) == 1


def test_retry_after_raises_at_most_once_per_value_seconds_and_ignores_a_trickle():
    tracker = RetryAfter(1, 32)
    for second in range(10):
        assert tracker.shed(second) == 1  # one a second: never 3 x value
    bursty = RetryAfter(1, 32)
    for _ in range(50):
        bursty.shed(0.5)
    assert bursty.current(1) == 2  # raised at the next second ...
    for _ in range(50):
        bursty.shed(1.5)
    assert bursty.current(2) == 2  # ... but not again before 2 s have passed
    assert bursty.current(3) == 4


# -- token buckets -----------------------------------------------------------------------
def test_token_bucket_grants_the_burst_then_the_rate():
    bucket = TokenBucket(rate=2, burst=3, now=0)
    assert [bucket.take(0) for _ in range(3)] == [0, 0, 0]
    assert bucket.take(0) == pytest.approx(0.5)
    assert bucket.take(0.5) == 0
    assert bucket.take(0.5) == pytest.approx(0.5)
    assert bucket.take(100) == 0  # refills to the burst, no more
    assert [bucket.take(100) for _ in range(3)][-1] > 0


def test_bucket_set_is_bounded_and_evicts_least_recently_used():
    buckets = BucketSet(qps=1, burst=1, capacity=3)
    for key in "abc":
        assert buckets.take(key, 0) == 0
    assert buckets.take("a", 0) > 0  # a is now most recent
    assert buckets.take("d", 0) == 0  # evicts b
    assert len(buckets) == 3
    assert buckets.take("b", 0) == 0  # came back with a fresh burst
    assert whole_seconds(0.01) == 1 and whole_seconds(2.2) == 3


# -- admission ---------------------------------------------------------------------------
def admission(**kwargs) -> Admission:
    return Admission(OverloadPolicy(**kwargs))


def test_inflight_limit_sheds_with_429_material_and_a_release_makes_room():
    adm = admission(limits=GroupLimits(max_queue_wait=0, max_inflight=10), reserved_percent=20)
    tickets = [adm.admit(LIST_PODS, OPERATOR, "pod", 0) for _ in range(8)]
    assert all(isinstance(t, Ticket) for t in tickets)
    shed = adm.admit(LIST_PODS, OPERATOR, "pod", 0)
    assert isinstance(shed, Rejection)
    assert (shed.reason, shed.detail, shed.retry_after) == ("inflight", "pod", 1)
    assert "Too many requests" in shed.message
    assert isinstance(adm.admit(LIST_PODS, OPERATOR, "config", 0), Ticket)  # per group
    tickets[0].release()
    tickets[0].release()  # idempotent
    assert isinstance(adm.admit(LIST_PODS, OPERATOR, "pod", 0), Ticket)
    assert adm.inflight["pod"] == 8


def test_heartbeats_take_seats_past_the_limit_and_are_never_shed():
    """In a restart storm the replica's own backlog fills the seats: a heartbeat (a node's
    lease or status) still gets one, and holds back the ordinary requests after it."""
    adm = admission(limits=GroupLimits(max_queue_wait=3, max_inflight=10), reserved_percent=20)
    ordinary = [adm.admit(LIST_PODS, OPERATOR, "config", 0) for _ in range(8)]
    assert all(isinstance(t, Ticket) and not t.pending for t in ordinary)
    waiting = adm.admit(LIST_PODS, OPERATOR, "config", 0)
    assert isinstance(waiting, Ticket) and waiting.pending  # the reserve is not theirs
    seated = []
    waiting.wait(lambda: seated.append(1))
    status = parse_request("PATCH", "/api/v1/nodes/n1/status")
    beats = [adm.admit(lease_of(n), node(n), "config", 0) for n in range(20)]
    beats += [adm.admit(status, node(n), "config", 0) for n in range(20)]
    assert all(isinstance(t, Ticket) and t.protected and not t.pending for t in beats)
    assert adm.inflight["config"] == 48  # past the 10 seats, counted
    for ticket in ordinary:
        ticket.release()
    assert not seated  # 40 heartbeats hold the group: the ordinary request still waits
    for ticket in beats:
        ticket.release()
    assert seated == [1] and adm.inflight["config"] == 1 and not adm.protected_inflight


def test_protected_requests_of_an_unverified_client_use_the_reserve_and_are_shed_last():
    """A bearer token is no identity the gateway can check (a client may mint any number):
    its protected requests skip the limits that are per client, may use the reserve,
    and are shed past the whole limit."""
    adm = admission(limits=GroupLimits(max_queue_wait=0, max_inflight=10), reserved_percent=20)
    for _ in range(8):
        adm.admit(LIST_PODS, OPERATOR, "config", 0)
    assert isinstance(adm.admit(LIST_PODS, OPERATOR, "config", 0), Rejection)
    leases = [adm.admit(LEASE_UPDATE, OPERATOR, "config", 0) for _ in range(2)]
    assert all(isinstance(t, Ticket) and t.protected for t in leases)
    assert isinstance(adm.admit(LEASE_UPDATE, OPERATOR, "config", 0), Rejection)  # full limit
    assert not adm.protected_inflight


def test_an_identity_past_its_heartbeats_in_flight_sends_ordinary_requests():
    """Protection is no way around the limits: one verified identity has at most
    `maxProtectedInflight` protected requests in flight, whatever User-Agent it sends;
    the next are ordinary (held to the group's limit less the reserve, to rate limits
    and to its share) and are shed like any."""
    leases = RequestMatch(resources=(parse_claim("leases.coordination.k8s.io"),))
    limit = RateLimitRule("leases", leases, 1, 1)
    adm = admission(limits=GroupLimits(max_queue_wait=0, max_inflight=6), reserved_percent=50,
                    per_client=ClientLimits(max_protected_inflight=2), rate_limits=(limit,))  # fmt: skip
    mine = [adm.admit(LEASE_UPDATE, node(1, f"agent-{i}/v1"), "config", 0) for i in range(2)]
    assert all(isinstance(t, Ticket) and t.protected for t in mine)
    assert adm.protected_inflight == {node(1).identity: 2}
    third = adm.admit(LEASE_UPDATE, node(1, "agent-3/v1"), "config", 0)
    assert isinstance(third, Ticket) and not third.protected  # a rate-limit token, a seat
    assert adm.inflight["config"] == 3
    shed = adm.admit(LEASE_UPDATE, node(1), "config", 0)
    assert isinstance(shed, Rejection) and shed.reason == "rate-limit"
    assert isinstance(adm.admit(LEASE_UPDATE, node(2), "config", 0), Ticket)  # another node
    mine[0].release()
    assert isinstance(adm.admit(LEASE_UPDATE, node(1), "config", 0), Ticket)  # its own again
    off = admission(per_client=ClientLimits(max_protected_inflight=0))
    assert not off.admit(LEASE_UPDATE, KUBELET, "config", 0).protected


def test_exempt_clients_are_admitted_and_take_no_ones_seat():
    adm = admission(limits=GroupLimits(max_queue_wait=0, max_inflight=2, max_watches=1))
    exempt = [adm.admit(LIST_PODS, ADMIN, "pod", 0) for _ in range(50)]  # system:masters
    exempt += [adm.admit(WATCH_PODS, ADMIN, "pod", 0) for _ in range(5)]
    assert all(isinstance(t, Ticket) for t in exempt)
    assert adm.exempt["pod"] == 55 and adm.load() == 0.0  # counted apart
    # everyone else still finds the group's seats free
    assert isinstance(adm.admit(LIST_PODS, OPERATOR, "pod", 0), Ticket)
    assert isinstance(adm.admit(WATCH_PODS, KUBELET, "pod", 0), Ticket)
    assert adm.inflight["pod"] == 1 and adm.load() == 0.5
    # an exempt client's responses are held to the buffered-bytes budget like anyone's,
    # and its short requests fetch with one of its own seats (clientshare.py)
    assert {t.client for t in exempt} == {ADMIN.key}
    assert [t.exempt for t in exempt] == [True] * 50 + [False] * 5
    adm.buffers.hold(ADMIN.key, adm.policy.per_client.max_buffered_bytes)
    assert isinstance(adm.admit(LIST_PODS, ADMIN, "pod", 0), Ticket)  # but never shed
    for ticket in exempt:
        ticket.release()
    assert adm.exempt["pod"] == 1


def test_watch_limit_and_other_long_running_requests_are_not_in_flight():
    adm = admission(limits=GroupLimits(max_queue_wait=0, max_inflight=1, max_watches=2))
    for _ in range(2):
        assert isinstance(adm.admit(WATCH_PODS, KUBELET, "pod", 0), Ticket)
    shed = adm.admit(WATCH_PODS, KUBELET, "pod", 0)
    assert isinstance(shed, Rejection) and shed.reason == "watches"
    for _ in range(5):  # logs -f: long-running, not limited
        assert isinstance(adm.admit(LOGS, KUBELET, "pod", 0), Ticket)
    assert isinstance(adm.admit(LIST_PODS, KUBELET, "pod", 0), Ticket)
    assert adm.load() == 1.0


def test_rate_limit_rule_per_rule_and_per_client():
    lists = RequestMatch(clients=Match(user_agent=Glob("my-operator/*")), verbs=frozenset({"list"}))
    shared = RateLimitRule("operator-lists", lists, qps=1, burst=2)
    adm = admission(rate_limits=(shared,))
    other = Client("my-operator/v2", "token:other", "10.0.0.9")
    assert isinstance(adm.admit(LIST_PODS, OPERATOR, "pod", 0), Ticket)
    assert isinstance(adm.admit(LIST_PODS, other, "pod", 0), Ticket)
    shed = adm.admit(LIST_PODS, OPERATOR, "pod", 0)
    assert isinstance(shed, Rejection)
    assert (shed.reason, shed.detail, shed.retry_after) == ("rate-limit", "operator-lists", 1)
    assert "1 qps, burst 2" in shed.message
    assert isinstance(adm.admit(WATCH_PODS, OPERATOR, "pod", 0), Ticket)  # not a list
    assert isinstance(adm.admit(LIST_PODS, KUBELET, "pod", 0), Ticket)  # not matched
    assert isinstance(adm.admit(LIST_PODS, OPERATOR, "pod", 1.0), Ticket)  # refilled

    per_client = admission(rate_limits=(RateLimitRule("each", lists, 1, 1, per_client=True),))
    assert isinstance(per_client.admit(LIST_PODS, OPERATOR, "pod", 0), Ticket)
    assert isinstance(per_client.admit(LIST_PODS, other, "pod", 0), Ticket)
    assert isinstance(per_client.admit(LIST_PODS, OPERATOR, "pod", 0), Rejection)


def test_rate_limits_spare_protected_and_exempt_requests():
    everyone = RateLimitRule("everyone", RequestMatch(), qps=1, burst=1)
    adm = admission(rate_limits=(everyone,))
    adm.admit(LIST_PODS, OPERATOR, "pod", 0)
    assert isinstance(adm.admit(LIST_PODS, OPERATOR, "pod", 0), Rejection)
    assert isinstance(adm.admit(LEASE_UPDATE, KUBELET, "config", 0), Ticket)
    assert isinstance(adm.admit(LIST_PODS, ADMIN, "pod", 0), Ticket)


def test_request_match_conditions():
    match = RequestMatch(
        verbs=frozenset({"update"}),
        resources=(parse_claim("leases.coordination.k8s.io"),),
        groups=frozenset({"config"}),
        namespaces=(Glob("kube-node-*"),),
    )
    assert match.matches(LEASE_UPDATE, KUBELET, "config")
    assert not match.matches(LEASE_UPDATE, KUBELET, "default")
    assert not match.matches(parse_request("GET", LEASE_UPDATE.path), KUBELET, "config")
    other_ns = parse_request("PUT", "/apis/coordination.k8s.io/v1/namespaces/kube-system/leases/x")
    assert not match.matches(other_ns, KUBELET, "config")
    assert not RequestMatch(resources=(parse_claim("pods"),)).matches(
        parse_request("GET", "/healthz"), KUBELET, "default"
    )
    assert RequestMatch(resources=(parse_claim("pods"),)).matches(LOGS, KUBELET, "pod")
    assert not RequestMatch(resources=(parse_claim("pods/status"),)).matches(LOGS, KUBELET, "pod")


def test_retry_after_grows_for_a_group_that_stays_overloaded():
    adm = admission(limits=GroupLimits(max_queue_wait=0, max_inflight=1))
    adm.admit(LIST_PODS, OPERATOR, "pod", 0)
    values = []
    for second in range(12):
        for i in range(20):
            shed = adm.admit(LIST_PODS, OPERATOR, "pod", second + i / 20)
            assert isinstance(shed, Rejection)
        values.append(shed.retry_after)
    assert values[0] == 1 and values[-1] >= 8 and values == sorted(values)


def test_reconfigure_keeps_counts_and_unchanged_buckets():
    rule = RateLimitRule("r", RequestMatch(), qps=1, burst=1)
    adm = admission(rate_limits=(rule,), limits=GroupLimits(max_queue_wait=0, max_inflight=5))
    ticket = adm.admit(LIST_PODS, OPERATOR, "pod", 0)
    adm.configure(OverloadPolicy(rate_limits=(rule,), limits=GroupLimits(max_queue_wait=0, max_inflight=1)))
    assert isinstance(adm.admit(LIST_PODS, OPERATOR, "pod", 0), Rejection)  # bucket kept
    adm.configure(OverloadPolicy(limits=GroupLimits(max_queue_wait=0, max_inflight=1)))
    assert isinstance(adm.admit(LIST_PODS, OPERATOR, "pod", 0), Rejection)  # count kept
    assert isinstance(ticket, Ticket)
    ticket.release()
    assert isinstance(adm.admit(LIST_PODS, OPERATOR, "pod", 0), Ticket)


# -- load and GOAWAY ---------------------------------------------------------------------
def test_goaway_chance_is_the_base_below_soft_load_and_rises_to_the_max():
    policy = GoawayPolicy(chance=0.001, max_chance=0.02, soft_load=0.6)
    assert goaway_chance(0.0, policy) == 0.001
    assert goaway_chance(0.6, policy) == 0.001
    assert goaway_chance(0.8, policy) == pytest.approx(0.001 + 0.019 / 2)
    assert goaway_chance(1.0, policy) == pytest.approx(0.02)
    assert goaway_chance(5.0, policy) == pytest.approx(0.02)
    rising = [goaway_chance(x / 10, policy) for x in range(12)]
    assert rising == sorted(rising)


def test_connection_deadline_spreads_within_the_jitter():
    assert connection_deadline(10, 0, 0.1, 0.5) is None
    assert connection_deadline(10, 100, 0.1, 0.0) == pytest.approx(100)
    assert connection_deadline(10, 100, 0.1, 0.5) == pytest.approx(110)
    assert connection_deadline(10, 100, 0.1, 0.999999) == pytest.approx(120)


def test_load_meter_combines_inflight_lag_and_streams():
    meter = LoadMeter(window=1.0)
    policy = GoawayPolicy(lag_budget=0.1, stream_budget=1000)
    assert meter.load(0.3, 100, policy) == 0.3
    assert meter.load(0.3, 800, policy) == 0.8
    for _ in range(20):
        meter.observe_lag(0.2, 0.25)  # the loop is 200 ms late, again and again
    assert meter.lag == pytest.approx(0.2, rel=0.01)
    assert meter.load(0.3, 100, policy) == pytest.approx(2.0, rel=0.01)
    for _ in range(20):
        meter.observe_lag(0.0, 0.25)
    assert meter.lag < 0.01
    assert meter.load(0.0, 0, GoawayPolicy(lag_budget=0, stream_budget=0)) == 0.0


# -- YAML --------------------------------------------------------------------------------
GROUPS = """\
groups:
  default: {endpoints: ["https://10.0.0.10:6443"]}
  event: {endpoints: ["https://10.0.3.10:6443"], resources: [events]}
"""


def load(extra: str):
    return load_config_text(GROUPS + textwrap.dedent(extra), "test.yaml")


def errors_of(extra: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load(extra)
    return [str(issue) for issue in info.value.issues]


def test_overload_goaway_and_http2_sections():
    config = load("""\
        overload:
          maxInflight: 600
          maxWatches: 5000
          reservedPercent: 5
          groups:
            event: {maxInflight: 100}
          retryAfter: {minSeconds: 2, maxSeconds: 16}
          exempt: []
          protected:
            - {resources: [leases.coordination.k8s.io], namespaces: [kube-node-lease]}
          rateLimits:
            - name: operator-lists
              match: {userAgent: "my-operator/*", verbs: [list], groups: [default]}
              qps: 5
              burst: 10
              per: client
        goaway:
          chance: 0.001
          maxChance: 0.02
          softLoad: 0.5
          maxConnectionAgeSeconds: 600
          maxConnectionAgeJitter: 0.2
        http2:
          downstream: {pingIntervalSeconds: 0, maxFrameSizeBytes: 16384, connectionWindowBytes: 0}
          upstream: {maxConcurrentStreams: 250, initialStreamWindowBytes: 1048576}
        """)
    o = config.overload
    assert o.limits_for("default") == GroupLimits(600, 5000)
    assert o.limits_for("event") == GroupLimits(100, 5000)
    assert (o.reserved_percent, o.retry_after_min, o.retry_after_max) == (5, 2, 16)
    assert o.exempt == ()
    assert o.protected[0].namespaces[0].pattern == "kube-node-lease"
    (rule,) = o.rate_limits
    assert (rule.name, rule.qps, rule.burst, rule.per_client) == ("operator-lists", 5, 10, True)
    assert rule.match.verbs == {"list"} and rule.match.groups == {"default"}
    g = config.goaway
    assert (g.chance, g.soft_load, g.max_connection_age, g.max_connection_age_jitter) == (
        0.001, 0.5, 600, 0.2)  # fmt: skip
    assert config.http2_downstream.ping_interval == 0
    assert config.http2_downstream.max_frame_size == 16384
    assert config.http2_upstream.max_concurrent_streams == 250
    assert config.http2_upstream.initial_stream_window == 1 << 20


def test_overload_defaults_protect_leases_and_exempt_masters():
    o = load("").overload
    assert o.limits_for("event") == GroupLimits(1000, 0)
    assert o.protected[0].matches(LEASE_UPDATE, KUBELET, "config")
    status = parse_request("PATCH", "/api/v1/nodes/n1/status")
    assert o.protected[1].matches(status, KUBELET, "config")  # the other heartbeat
    node_patch = parse_request("PATCH", "/api/v1/nodes/n1")
    assert not any(m.matches(node_patch, KUBELET, "config") for m in o.protected)
    list_leases = parse_request("GET", "/apis/coordination.k8s.io/v1/leases")
    assert not o.protected[0].matches(list_leases, KUBELET, "config")  # a LIST storm is not
    assert o.exempt[0].matches(LIST_PODS, ADMIN, "pod")
    assert not o.exempt[0].matches(LIST_PODS, KUBELET, "pod")


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ("overload: {groups: {nope: {maxInflight: 1}}}", "overload.groups.nope: unknown key"),
        ("overload: {maxInflight: -1}", "overload.maxInflight: must be a positive whole"),
        ("overload: {retryAfter: {minSeconds: 8, maxSeconds: 2}}", "maxSeconds (2) is below"),
        ("overload: {protected: [{verbs: [fly]}]}", "unknown verb 'fly'"),
        ("overload: {exempt: [{groups: [pod]}]}", "no group named 'pod'"),
        ("overload: {exempt: [{resources: ['a/b/c']}]}", "overload.exempt[0].resources[0]"),
        ("overload: {rateLimits: [{name: x}]}", "missing required key 'qps'"),
        ("overload: {rateLimits: [{qps: 1}]}", "missing required key 'name'"),
        ("overload: {rateLimits: [{name: x, qps: 1, per: node}]}", "must be 'rule' or 'client'"),
        (
            "overload: {rateLimits: [{name: x, qps: 1}, {name: x, qps: 2}]}",
            "rule name 'x' is used twice",
        ),
        ("goaway: {chance: 0.5, maxChance: 0.02}", "chance (0.5) is above maxChance"),
        ("goaway: {softLoad: 1.5}", "goaway.softLoad: must be at most 0.99"),
        ("http2: {downstream: {maxFrameSizeBytes: 1000}}", "must be from 16384 to 16777215"),
        (
            "http2: {upstream: {initialStreamWindowBytes: 4294967296}}",
            "must be from 65535 to 2147483647",
        ),
        ("http2: {upstream: {bogus: 1}}", "http2.upstream.bogus: unknown key"),
    ],
)
def test_overload_errors(extra, expected):
    assert any(expected in e for e in errors_of(extra)), errors_of(extra)


def test_high_goaway_chance_warns():
    config = load("goaway: {maxChance: 0.1}")
    assert any("kube-apiserver's own cap" in w.message for w in config.warnings)


# -- fair share per client ---------------------------------------------------------------
def test_one_client_cannot_take_more_than_its_requests_in_flight():
    # (a group of 6 seats: contended from 3 taken, where one client's 3 already are; no
    # queueing: past its share, shed at once)
    admission = Admission(OverloadPolicy(limits=GroupLimits(max_inflight=6, max_queue_wait=0),
                                         per_client=ClientLimits(max_inflight=3)))  # fmt: skip
    tickets = [admission.admit(LIST_PODS, KUBELET, "pod", 0.0) for _ in range(3)]
    assert all(isinstance(t, Ticket) for t in tickets)
    refused = admission.admit(LIST_PODS, KUBELET, "pod", 0.0)
    assert isinstance(refused, Rejection) and refused.reason == "client-inflight"
    assert "3 requests in flight" in refused.message and refused.retry_after >= 1
    # others keep their share; the client's own exemptions hold
    assert isinstance(admission.admit(LIST_PODS, OPERATOR, "pod", 0.0), Ticket)
    lease = admission.admit(LEASE_UPDATE, KUBELET, "config", 0.0)
    assert isinstance(lease, Ticket) and lease.protected
    assert isinstance(admission.admit(WATCH_PODS, KUBELET, "pod", 0.0), Ticket)  # long-running
    assert all(isinstance(admission.admit(LIST_PODS, ADMIN, "pod", 0.0), Ticket)
               for _ in range(10))  # system:masters
    tickets[0].release()
    tickets[0].release()  # once only
    assert isinstance(admission.admit(LIST_PODS, KUBELET, "pod", 0.0), Ticket)
    for t in tickets[1:]:
        t.release()
    assert admission.client_inflight == {KUBELET.key: 1, OPERATOR.key: 1}


def test_a_client_past_its_share_is_held_to_it_only_while_its_group_is_contended():
    """As APF seats any flow while its priority level has room: a controller whose
    requests pile up (a restart storm slows every answer) is not shed by a group far
    from full; once half the group's seats are taken, it is held to its share."""
    admission = Admission(OverloadPolicy(limits=GroupLimits(max_inflight=20, max_queue_wait=0),
                                         per_client=ClientLimits(max_inflight=3)))  # fmt: skip
    mine = [admission.admit(LIST_PODS, KUBELET, "pod", 0.0) for _ in range(9)]
    assert all(isinstance(t, Ticket) for t in mine)  # 9 of 20 seats: past its share
    others = [admission.admit(LIST_PODS, OPERATOR, "pod", 0.0) for _ in range(1)]
    refused = admission.admit(LIST_PODS, KUBELET, "pod", 0.0)  # 10 of 20: contended
    assert isinstance(refused, Rejection) and refused.reason == "client-inflight"
    assert isinstance(admission.admit(LIST_PODS, OPERATOR, "pod", 0.0), Ticket)  # theirs
    elsewhere = admission.admit(LIST_PODS, KUBELET, "config", 0.0)
    assert isinstance(elsewhere, Ticket)  # an idle group's seats are anyone's
    for ticket in (*others, elsewhere, mine[0]):
        ticket.release()  # the pod group: 9 of 20 again
    assert isinstance(admission.admit(LIST_PODS, KUBELET, "pod", 0.0), Ticket)
    # with no group limit, nothing else bounds a client: its share always holds
    unlimited = Admission(OverloadPolicy(limits=GroupLimits(max_inflight=0, max_queue_wait=0),
                                         per_client=ClientLimits(max_inflight=3)))  # fmt: skip
    assert [type(unlimited.admit(LIST_PODS, KUBELET, "pod", 0.0)).__name__
            for _ in range(4)] == ["Ticket"] * 3 + ["Rejection"]  # fmt: skip


def test_past_its_share_a_client_waits_for_its_own_seats_as_apf_queues_a_flow():
    """Found by the load model: in a storm a controller creating 20 pods a second had
    ~180 requests in flight while the kubelets' LISTs filled half the group, and was
    shed at once. APF would queue them. Now its requests past its share wait for one of
    its own seats (then for the group's), at most as many as its share, at most the
    group's max_queue_wait; only then is it shed."""
    admission = Admission(OverloadPolicy(
        limits=GroupLimits(max_inflight=4), reserved_percent=0,
        per_client=ClientLimits(max_inflight=2)))  # fmt: skip
    mine = [admission.admit(LIST_PODS, KUBELET, "pod", 0.0) for _ in range(2)]
    assert not any(t.pending for t in mine)  # 2 of 4 seats: contended from here
    seated: list[str] = []
    waiting = []
    for name in ("third", "fourth"):
        ticket = admission.admit(LIST_PODS, KUBELET, "pod", 0.0)
        assert isinstance(ticket, Ticket) and ticket.pending and ticket.over_share
        ticket.wait(lambda name=name: seated.append(name))
        waiting.append(ticket)
    refused = admission.admit(LIST_PODS, KUBELET, "pod", 0.0)  # as many waiting as its share
    assert isinstance(refused, Rejection) and refused.reason == "client-inflight"
    assert admission.client_inflight == {KUBELET.key: 2} and admission.inflight["pod"] == 2
    assert admission.queued_by_group() == {"pod": 2} and not seated
    theirs = admission.admit(LIST_PODS, OPERATOR, "pod", 0.0)  # another client: its share
    assert isinstance(theirs, Ticket) and not theirs.pending
    other = Client("other/v1", "token:def", "10.0.0.4")
    queued = admission.admit(LIST_PODS, other, "pod", 0.0)  # the group's 4th seat
    assert isinstance(queued, Ticket) and not queued.pending
    last = admission.admit(LIST_PODS, other, "pod", 0.0)  # the group is full: its queue
    assert isinstance(last, Ticket) and last.pending and not last.over_share
    last.wait(lambda: seated.append("other"))
    # one of the kubelet's requests ends: the group's seat goes to the group's queue
    # first, the client's seat to its first waiting request, which now waits for the group
    mine[0].release()
    assert seated == ["other"]
    assert not waiting[0].over_share and waiting[0].pending
    assert admission.client_inflight[KUBELET.key] == 2
    theirs.release()  # a group seat: the kubelet's third request is served
    assert seated == ["other", "third"] and not waiting[0].pending
    rejection = waiting[1].give_up(15.0)  # the fourth waited max_queue_wait: shed
    assert rejection.reason == "client-inflight"
    waiting[1].release()
    assert admission.queued == 0 and not any(admission.queued_by_group().values())
    for ticket in (mine[1], waiting[0], queued, last):
        ticket.release()
    assert admission.inflight["pod"] == 0 and not admission.client_inflight
    assert not admission.client_queues
    # a group with no limit: the same wait, ended by the release of one of its own
    unlimited = Admission(OverloadPolicy(limits=GroupLimits(max_inflight=0),
                                         per_client=ClientLimits(max_inflight=2)))  # fmt: skip
    mine = [unlimited.admit(LIST_PODS, KUBELET, "pod", 0.0) for _ in range(2)]
    third = unlimited.admit(LIST_PODS, KUBELET, "pod", 0.0)
    assert isinstance(third, Ticket) and third.pending and third.over_share
    third.wait(lambda: seated.append("unlimited"))
    mine[0].release()
    assert seated[-1] == "unlimited" and not third.pending
    assert unlimited.client_inflight == {KUBELET.key: 2} and unlimited.queued == 0
    for ticket in (mine[1], third):
        ticket.release()
    assert not unlimited.client_inflight and not unlimited.inflight.get("pod")


def test_a_client_over_its_byte_budget_gets_no_new_request_until_it_reads():
    admission = Admission(OverloadPolicy(per_client=ClientLimits(max_buffered_bytes=1000)))
    ticket = admission.admit(LIST_PODS, KUBELET, "pod", 0.0)
    assert ticket.client == KUBELET.key
    admission.buffers.hold(KUBELET.key, 1000)
    refused = admission.admit(LIST_PODS, KUBELET, "pod", 0.0)
    assert isinstance(refused, Rejection) and refused.reason == "client-buffer"
    assert isinstance(admission.admit(LIST_PODS, OPERATOR, "pod", 0.0), Ticket)
    assert isinstance(admission.admit(LEASE_UPDATE, KUBELET, "config", 0.0), Ticket)
    # exempt: admitted, its responses held to its own budget (issue 22: never shed, but
    # a stalled exempt reader waits on itself too)
    assert admission.admit(LIST_PODS, ADMIN, "pod", 0.0).client == ADMIN.key


def test_credit_is_held_back_past_the_budget_and_returned_once_under_it():
    buffers = ClientBuffers(max_buffered=100)
    credited: list[str] = []
    for _ in range(3):
        buffers.hold("k", 60)
    assert buffers.over_budget("k") and buffers.total == 180
    buffers.release("k", 60, lambda n: credited.append("a"), 0)  # 120 left: over budget
    assert credited == []
    buffers.release("k", 60, lambda n: credited.append("b"), 0)  # 60 left: under it
    assert credited == ["b", "a"]
    buffers.release("k", 60, lambda n: credited.append("c"), 0)
    assert credited == ["b", "a", "c"] and buffers.buffered == {} and buffers.total == 0
    buffers.hold("k", 0)  # an empty DATA frame (END_STREAM) holds nothing
    buffers.release("k", 0, lambda n: credited.append("d"), 0)
    assert credited[-1] == "d" and buffers.buffered == {}


def test_no_budget_means_credit_at_once():
    buffers = ClientBuffers(max_buffered=0)
    buffers.hold("k", 10**9)
    assert not buffers.over_budget("k")
    done = []
    buffers.release("k", 10**9, done.append, 1)
    assert done == [1]


def test_per_client_limits_from_yaml():
    config = load_config_text(
        'groups:\n  default: {endpoints: ["http://127.0.0.1:1"]}\n'
        "overload: {perClient: {maxInflight: 20, maxBufferedBytes: 0}}\n")
    assert config.overload.per_client == ClientLimits(20, 0)
    config = load_config_text(
        'groups:\n  default: {endpoints: ["http://127.0.0.1:1"]}\n'
        "overload: {perClient: {maxProtectedInflight: 0}}\n")
    assert config.overload.per_client.max_protected_inflight == 0
    default = load_config_text('groups:\n  default: {endpoints: ["http://127.0.0.1:1"]}\n')
    assert default.overload.per_client == ClientLimits()


def test_exempt_requests_wait_for_their_own_clients_seat_never_shed():
    buffers = ClientBuffers(max_buffered=1000)
    buffers.max_seats = 2
    started = []
    assert buffers.seat("admin", lambda: started.append(1))
    assert buffers.seat("admin", lambda: started.append(2))
    assert not buffers.seat("admin", lambda: started.append(3))  # waits its turn
    assert buffers.seat("other", lambda: None)  # another client's seats are its own
    buffers.unseat("admin")
    assert started == [3] and buffers.seated["admin"] == 2
    # over its budget: no seat, though one is free, until it reads
    buffers.hold("admin", 1000)
    buffers.unseat("admin")
    assert not buffers.seat("admin", lambda: started.append(4)) and buffers.waiting("admin") == 1
    buffers.release("admin", 1000, lambda n: None, 1000)
    assert started == [3, 4] and buffers.waiting("admin") == 0


def test_a_full_group_queues_its_requests_in_order_then_sheds_the_rest():
    """As APF queues before it rejects: a request finding its group full waits for a
    seat (FIFO), leaves the queue when its client gives up, and is shed after its wait;
    at most QUEUE_PER_SEAT per seat wait, the rest are shed at once."""
    adm = admission(limits=GroupLimits(max_inflight=2, max_queue_wait=3), reserved_percent=0)
    seated = [adm.admit(LIST_PODS, OPERATOR, "pod", 0) for _ in range(2)]
    waiting = [adm.admit(LIST_PODS, KUBELET, "pod", 0) for _ in range(3)]
    assert [t.pending for t in seated + waiting] == [False] * 2 + [True] * 3
    assert adm.client_inflight[KUBELET.key] == 3  # they are its requests in flight
    order = []
    for i, ticket in enumerate(waiting):
        ticket.wait(lambda i=i: order.append(i))
    assert adm.queued == 3 and adm.inflight["pod"] == 2
    seated[0].release()
    assert order == [0] and not waiting[0].pending and adm.inflight["pod"] == 2
    waiting[1].release()  # its client went away while it waited
    shed = waiting[2].give_up(0.0)  # its wait is over
    assert isinstance(shed, Rejection) and shed.reason == "inflight" and shed.retry_after >= 1
    waiting[2].release()
    assert adm.queued == 0 and order == [0]
    for ticket in (seated[1], waiting[0]):
        ticket.release()
    assert adm.inflight["pod"] == 0 and not adm.client_inflight
    # the queue's bound: 4 per seat
    full = [adm.admit(LIST_PODS, OPERATOR, "pod", 0) for _ in range(2)]
    queued = [adm.admit(LIST_PODS, OPERATOR, "pod", 0) for _ in range(8)]
    for ticket in queued:
        ticket.wait(lambda: None)
    assert all(t.pending for t in queued)
    assert isinstance(adm.admit(LIST_PODS, OPERATOR, "pod", 0), Rejection)
    del full
