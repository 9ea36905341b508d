"""Fallback on any error: groups that are up but answer 5xx or reset, outlier ejection and
return, watch integrity. In process, against simulated groups with fault switches."""

import asyncio
import json
import time

import pytest
from harness import Stack

pytestmark = pytest.mark.usefixtures("engine")  # both HTTP/2 engines

HEALTH = ("health: {intervalSeconds: 0.2, timeoutSeconds: 0.5, failureThreshold: 2, "
          "consecutiveFailures: 3, baseEjectionSeconds: 0.6, maxEjectionSeconds: 5}\n")
POD = json.dumps({"metadata": {"name": "p1"},
                  "spec": {"containers": [{"name": "c", "image": "x"}]}}).encode()
FAULTS = {
    "500": ({"status_override": 500}, "upstream-5xx"),
    "503": ({"status_override": 503}, "upstream-5xx"),
    "reset": ({"reset_before_headers": True}, "reset-before-headers"),
}


def value(metric, *labels) -> float:
    return metric.labels(*labels)._value.get()


async def until(predicate, seconds: float = 10) -> None:
    async with asyncio.timeout(seconds):
        while not predicate():
            await asyncio.sleep(0.02)


@pytest.mark.parametrize("fault", FAULTS)
async def test_a_failing_replica_is_ejected_reads_never_fail_and_it_returns(fault):
    faults, reason = FAULTS[fault]
    s = await Stack().start(extra=HEALTH, replicas={"pod": 2})
    try:
        c = await s.client()
        m = s.gateway.metrics
        bad = s.gateway.upstreams.groups["pod"][1]
        s.sim.groups["pod-1"].faults.update(faults)
        reads = [await c.request("GET", "/api/v1/pods") for _ in range(20)]
        assert [r.status for r in reads] == [200] * 20  # not one failed read
        # a few reached the bad replica and were answered by default, then it was ejected
        assert 1 <= value(m.fallbacks, "pod", "default", reason) <= 6
        assert value(m.ejections, "pod", bad.name, "consecutive-failures") >= 1
        assert {r.group for r in reads[-4:]} == {"pod"}  # the good replica serves the rest
        if fault == "reset":
            # the simulated reset hits /readyz too: its probes keep it out while it lasts
            await until(lambda: bad.health.probe_down)
            assert value(m.ejections, "pod", bad.name, "probe") == 0  # already out: no news
        else:
            # its probes pass (only requests show the fault): it comes back by itself
            # after the base ejection time, fails again, and is out for longer
            before = value(m.ejections, "pod", bad.name, "consecutive-failures")
            await until(lambda: value(m.endpoint_healthy, "pod", bad.name) == 1)
            for _ in range(10):
                assert (await c.request("GET", "/api/v1/pods")).status == 200
            assert value(m.ejections, "pod", bad.name, "consecutive-failures") == before + 1
            ejected_for = bad.health.ejected_until - bad.health.last_ejection
            assert ejected_for == pytest.approx(0.6 * bad.health.ejections)
            assert bad.health.ejections >= 2
        # healed: back for good, and serving again
        s.sim.groups["pod-1"].faults.update({k: type(v)() for k, v in faults.items()})
        await until(lambda: value(m.endpoint_healthy, "pod", bad.name) == 1)
        groups = {(await c.request("GET", "/api/v1/pods")).headers[b"x-kom-sim-group"]
                  for _ in range(6)}
        assert groups == {b"pod", b"pod-1"}
    finally:
        await s.close()


@pytest.mark.parametrize("fault", FAULTS)
async def test_writes_are_not_replayed(fault):
    faults, _ = FAULTS[fault]
    s = await Stack().start(extra=HEALTH)
    try:
        c = await s.client()
        s.sim.groups["pod"].faults.update(faults)
        write = await c.request("POST", "/api/v1/namespaces/default/pods", body=POD)
        # the apiserver's own 5xx; after a reset, ours: 503 "may have been applied"
        assert write.status == (faults.get("status_override") or 503)
        assert s.sim.groups["default"].served["create pods"] == 0
    finally:
        await s.close()


async def test_a_lone_endpoint_that_fails_requests_is_ejected_though_its_probe_passes():
    """Default can answer whatever another group cannot, so a group's last endpoint is
    ejected like any other: after `consecutiveFailures` failed reads (each answered by
    default) its writes go to default too instead of failing, until it is back."""
    s = await Stack().start(extra=HEALTH)
    try:
        c = await s.client()
        s.sim.groups["pod"].faults.status_override = 503
        reads = [await c.request("GET", "/api/v1/pods") for _ in range(12)]
        assert {(r.status, r.group) for r in reads} == {(200, "default")}
        assert s.sim.groups["pod"].served["list pods"] == 3  # the threshold, then ejected
        endpoint = s.gateway.upstreams.groups["pod"][0]
        assert not endpoint.healthy
        assert s.gateway.metrics.registry.get_sample_value(
            "kom_gateway_upstream_ejections_total",
            {"group": "pod", "endpoint": endpoint.name, "reason": "consecutive-failures"}) == 1
        write = await c.request("POST", "/api/v1/namespaces/default/pods", body=POD)
        assert (write.status, write.group) == (201, "default")
        s.sim.groups["pod"].faults.status_override = 0
        await asyncio.sleep(0.8)  # its ejection time is up
        assert (await c.request("GET", "/api/v1/pods")).group == "pod"
    finally:
        await s.close()


async def test_a_lone_endpoint_whose_probe_fails_too_is_taken_out_then_writes_go_default():
    s = await Stack().start(extra=HEALTH)
    try:
        c = await s.client()
        m = s.gateway.metrics
        endpoint = s.gateway.upstreams.groups["pod"][0]
        s.sim.groups["pod"].faults.update({"status_override": 500, "readyz_status": 500})
        for _ in range(5):
            assert (await c.request("GET", "/api/v1/pods")).status == 200
        await until(lambda: not endpoint.healthy)
        assert value(m.ejections, "pod", endpoint.name, "consecutive-failures") == 1
        await asyncio.sleep(1.0)  # past its ejection time (0.6 s): its failing probe
        assert not endpoint.healthy and endpoint.health.probe_down  # keeps it out
        write = await c.request("POST", "/api/v1/namespaces/default/pods", body=POD)
        assert (write.status, write.group) == (201, "default")  # nothing was sent to pod
        assert value(m.fallbacks, "pod", "default", "no-healthy-endpoint") >= 1
        s.sim.groups["pod"].faults.update({"status_override": 0, "readyz_status": 0})
        await until(lambda: endpoint.healthy)
        assert (await c.request("GET", "/api/v1/pods")).group == "pod"
    finally:
        await s.close()


async def test_upstream_4xx_and_429_are_answers_not_failures():
    s = await Stack().start(extra=HEALTH)
    try:
        c = await s.client()
        for _ in range(6):
            r = await c.request("GET", "/api/v1/namespaces/default/pods/missing")
            assert (r.status, r.group) == (404, "pod")
        s.sim.groups["pod"].faults.throttle = 1.0
        for _ in range(6):
            assert (await c.request("GET", "/api/v1/pods")).status == 429
        assert s.gateway.upstreams.groups["pod"][0].health.consecutive_failures == 0
        assert not s.gateway.metrics.fallbacks._metrics
    finally:
        await s.close()


async def test_a_watch_failing_before_its_200_goes_to_default():
    s = await Stack().start(extra=HEALTH)
    try:
        c = await s.client()
        s.sim.groups["pod"].faults.status_override = 503
        watch = c.open("GET", "/api/v1/namespaces/default/pods?watch=1")
        async with asyncio.timeout(5):
            await watch.got_headers.wait()
        assert (watch.status, watch.headers[b"x-kom-sim-group"]) == (200, b"default")
        watch.stream.cancel()
    finally:
        await s.close()


async def test_a_watch_cut_inside_an_event_is_reset_between_events_ends_cleanly():
    s = await Stack().start(extra=HEALTH)
    try:
        c = await s.client()
        await c.request("POST", "/api/v1/namespaces/default/pods", body=POD)
        m = s.gateway.metrics
        s.sim.groups["pod"].faults.reset_mid_event = True
        cut = await c.request("GET", "/api/v1/namespaces/default/pods?watch=1&resourceVersion=0")
        assert cut.status == 200 and cut.body and not cut.body.endswith(b"\n")
        assert cut.reset  # half an object must never look like a clean end
        s.sim.groups["pod"].faults.reset_mid_event = False
        s.sim.groups["pod"].faults.reset_mid_body = True  # after whole events
        whole = await c.request("GET", "/api/v1/namespaces/default/pods?watch=1&resourceVersion=0")
        assert whole.status == 200 and whole.body.endswith(b"\n")
        assert not whole.reset  # the client re-watches from its last resourceVersion
        assert json.loads(whole.body.splitlines()[0])["type"] == "ADDED"
        assert value(m.broken_responses, "pod", "watch") == 2
    finally:
        await s.close()


async def test_a_greedy_stalled_client_waits_on_itself_others_keep_their_share():
    """A client that opens many big LISTs and never reads is held to its share: new
    requests get 429 once the gateway holds its byte budget for it (or its requests in
    flight reach their limit); another client is not refused once, and what the gateway
    holds for the greedy one stays within budget + one upstream window."""
    from harness import Collector

    budget = 1 << 20
    s = await Stack().start(extra=HEALTH + (
        f"overload: {{maxInflight: 40, perClient: {{maxInflight: 8, maxBufferedBytes: {budget}}}}}\n"))
    try:
        setup = await s.client()
        blob = "x" * 400_000
        for i in range(6):  # ~2.4 MB per LIST
            body = json.dumps({"metadata": {"name": f"big{i}"}, "data": {"blob": blob}}).encode()
            r = await setup.request("POST", "/api/v1/namespaces/default/configmaps", body=body)
            assert r.status == 201
        greedy = await s.client(stream_window=65535)
        buffers = s.gateway.admission.buffers
        key = "addr:127.0.0.1|greedy"
        statuses = []
        for _ in range(12):
            stalled = greedy.open("GET", "/api/v1/namespaces/default/configmaps",
                                  user_agent="greedy/1.0", collector=Collector(auto_ack=False))
            async with asyncio.timeout(5):
                await stalled.got_headers.wait()
            statuses.append(stalled.status)
            if stalled.status == 200:  # its upstream window (256 KiB) fills; 64 KiB went out
                admitted = statuses.count(200)
                await until(lambda n=admitted: buffers.buffered.get(key, 0) >= 150_000 * n)
        assert 200 in statuses and 429 in statuses
        assert statuses == sorted(statuses)  # admitted until over its share, then refused
        assert statuses.count(200) <= 8
        assert buffers.buffered[key] <= budget + 256 * 1024  # one upstream window past it
        shed = s.gateway.metrics.shed
        assert value(shed, "config", "client-buffer") + value(shed, "config", "client-inflight") >= 1
        normal = await s.client()
        for _ in range(20):
            r = await normal.request("GET", "/api/v1/namespaces/default/configmaps/big0",
                                     user_agent="kubectl/v1.31.0")
            assert r.status == 200  # never a 429: its share is its own
        greedy.conn.close()  # gone without reading: everything held for it is let go
        await until(lambda: key not in buffers.buffered)
        assert buffers.total == 0
    finally:
        await s.close()


async def test_an_opt_in_header_names_who_answered():
    s = await Stack().start(extra=HEALTH + "debug: {answeredByHeader: X-Kom-Answered-By}\n")
    try:
        c = await s.client()
        r = await c.request("GET", "/api/v1/pods")
        assert r.headers[b"x-kom-answered-by"] == b"pod"
        s.sim.groups["pod"].faults.status_override = 503
        r = await c.request("GET", "/api/v1/pods")
        assert r.headers[b"x-kom-answered-by"] == b"default; fallback=upstream-5xx"
        s.sim.groups["default"].faults.status_override = 503
        r = await c.request("GET", "/apis/apps/v1/deployments")
        assert (r.status, r.headers[b"x-kom-answered-by"]) == (503, b"default")
        r = await c.request("GET", "/api/v1/namespaces/%zz/pods")  # malformed: ours
        assert (r.status, r.headers[b"x-kom-answered-by"]) == (400, b"gateway")
    finally:
        await s.close()
    off = await Stack().start(extra=HEALTH)
    try:
        r = await (await off.client()).request("GET", "/api/v1/pods")
        assert b"x-kom-answered-by" not in r.headers  # off by default
    finally:
        await off.close()


@pytest.mark.parametrize("fault", ["reset_after_headers", "reset_mid_body"])
async def test_a_group_breaking_its_responses_fails_at_most_the_threshold_of_reads(fault):
    """A group that resets every read after its response headers: each broken response
    counts toward the endpoint's ejection, so after `consecutiveFailures` (3) of them the
    reads go to default, whatever its probe says. One broken before any body byte
    reached the client is retried on default at once (its headers were held): 0 failed.
    One broken mid-body cannot be: at most the threshold of reads fail."""
    s = await Stack().start(extra=HEALTH)
    try:
        c = await s.client()
        assert (await c.request("POST", "/api/v1/namespaces/default/pods", body=POD)).status == 201
        s.sim.groups["pod"].faults.update({fault: True})
        paths = ["/api/v1/namespaces/default/pods/p1", "/api/v1/pods"] * 10
        reads = [await c.request("GET", path) for path in paths]
        failed = [r for r in reads if r.status != 200 or r.reset]
        endpoint = s.gateway.upstreams.groups["pod"][0]
        m = s.gateway.metrics
        assert value(m.ejections, "pod", endpoint.name, "consecutive-failures") == 1
        served = s.sim.groups["pod"].served
        assert served["get pods"] + served["list pods"] == 3  # then ejected
        if fault == "reset_after_headers":
            assert failed == []
            assert value(m.fallbacks, "pod", "default", "reset-before-body") == 3
            assert {r.group for r in reads} == {"default"}
        else:
            assert len(failed) == 3  # the threshold; the rest from default
            assert all(r.group == "default" for r in reads[3:])
            assert value(m.fallbacks, "pod", "default", "no-healthy-endpoint") == 17
    finally:
        await s.close()


async def test_held_response_headers_go_out_with_the_body_and_writes_are_not_held():
    """What holding a read's headers must not change: a response without a body (HEAD,
    an empty answer) still gets its headers, and a write's answer is not held."""
    s = await Stack().start(extra=HEALTH)
    try:
        c = await s.client()
        created = await c.request("POST", "/api/v1/namespaces/default/pods", body=POD)
        assert (created.status, created.group) == (201, "pod")
        head = await c.request("HEAD", "/api/v1/namespaces/default/pods/p1")
        assert (head.status, head.group, head.body) == (200, "pod", b"")
        missing = await c.request("GET", "/api/v1/namespaces/default/pods/nope")
        assert (missing.status, missing.group) == (404, "pod")
        endpoint = s.gateway.upstreams.groups["pod"][0]
        assert endpoint.health.consecutive_failures == 0
    finally:
        await s.close()


async def test_a_probe_timed_out_by_the_gateways_own_late_loop_is_no_verdict():
    """In a reconnect storm the gateway's loop can be seconds behind: a probe's answer
    sits unread, its timeout fires late, and a healthy endpoint (default's only one)
    taken out would turn the storm into 503s. Such a timeout is no verdict; one the loop
    noticed in time, from an endpoint that is slow, still is."""
    s = await Stack().start()
    try:
        endpoint = s.gateway.upstreams.groups["default"][0]
        assert endpoint.loop_lag == s.gateway._loop_lag  # judged by the load meter's lag
        endpoint.loop_lag = lambda: 0.0  # the loop keeps time
        s.sim.groups["default"].faults.latency = 3.0  # /readyz too: it never answers in time
        assert await endpoint.probe(1.0) is False  # the endpoint is slow: a verdict
        endpoint.loop_lag = lambda: 0.5
        assert await endpoint.probe(1.0) is None  # the loop was 0.5 s behind
        endpoint.loop_lag = lambda: 0.0

        async def blocked_loop() -> None:
            await asyncio.sleep(0.1)  # the probe is out
            time.sleep(1.6)  # the loop is stuck past the probe's deadline (as in a storm)

        verdict, _ = await asyncio.gather(endpoint.probe(1.0), blocked_loop())
        assert verdict is None
        s.sim.groups["default"].faults.latency = 0.0
        assert await endpoint.probe(1.0) is True
    finally:
        await s.close()
