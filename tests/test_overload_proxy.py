"""Overload through the running proxy: 429 + Retry-After + Status instead of timeouts,
rate limits, heartbeats never shed, load-aware and max-age GOAWAY seen by a bare h2 client,
and a drain that lets requests finish and ends watches cleanly."""

from __future__ import annotations

import asyncio
import json
import ssl

import h2.events
import h2.settings
import pytest
from harness import EVERYONE_CUT_OVER, FAST_HEALTH, Client, RawH2, Stack, config_text

from kom_gateway.config import ConfigHolder, load_config_text
from kom_gateway.http.h2.client import H2ClientConnection
from kom_gateway.http.serverconn import GOAWAY_LINGER_SECONDS, GOAWAY_PING, MAX_STREAM_ID
from kom_gateway.http.settings import H2ClientSettings
from kom_gateway.proxy.gateway import Gateway
from kom_gateway.server.run import RunOptions, drain, new_listener
from kom_gateway.server.tlsfiles import server_ssl_context

pytestmark = pytest.mark.usefixtures("engine")  # both HTTP/2 engines


LEASE = "/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/node-1"


async def started(extra: str) -> Stack:
    return await Stack().start(extra=FAST_HEALTH + extra)


def shed(stack: Stack, group: str, reason: str) -> float:
    return stack.gateway.metrics.registry.get_sample_value(
        "kom_gateway_shed_requests_total", {"group": group, "reason": reason}) or 0


def assert_too_many_requests(response) -> None:
    assert response.status == 429
    assert int(response.headers[b"retry-after"]) >= 1  # an integer: client-go retries
    status = response.json()
    assert (status["kind"], status["reason"], status["code"]) == ("Status", "TooManyRequests", 429)


async def test_over_the_inflight_limit_clients_get_429_not_timeouts():
    stack = await started("overload: {maxInflight: 4, maxQueueWaitSeconds: 0, reservedPercent: 0, exempt: []}\n")
    try:
        stack.sim.groups["pod"].faults.latency = 0.5
        client = await stack.client()
        responses = await asyncio.gather(
            *(client.request("GET", "/api/v1/pods", timeout=5) for _ in range(20)))
        ok = [r for r in responses if r.status == 200]
        assert len(ok) == 4 and all(r.group == "pod" for r in ok)
        for response in responses:
            if response.status != 200:
                assert_too_many_requests(response)
        assert shed(stack, "pod", "inflight") == 16
        assert stack.gateway.admission.inflight["pod"] == 0  # every ticket came back
        # other groups have their own limit
        assert (await client.request("GET", "/api/v1/nodes")).status == 200
    finally:
        await stack.close()


async def test_a_client_past_its_share_waits_for_its_own_seats_then_is_shed():
    """A group of 4 seats is contended from 2; a client with 2 in flight has its next
    requests wait for its own seats (as many as its share) and served once its first
    ones are answered; one more beyond those is shed."""
    stack = await started("overload: {maxInflight: 4, reservedPercent: 0, exempt: [],"
                          " perClient: {maxInflight: 2}}\n")
    try:
        stack.sim.groups["pod"].faults.latency = 0.5
        client = await stack.client()
        responses = await asyncio.gather(
            *(client.request("GET", "/api/v1/pods", timeout=10) for _ in range(5)))
        statuses = sorted(r.status for r in responses)
        assert statuses == [200, 200, 200, 200, 429]
        assert_too_many_requests(next(r for r in responses if r.status == 429))
        assert shed(stack, "pod", "client-inflight") == 1
        admission = stack.gateway.admission
        assert admission.inflight["pod"] == 0 and not admission.client_inflight
        assert admission.queued == 0 and not admission.client_queues
    finally:
        await stack.close()


SLOW_PROBES = "health: {intervalSeconds: 0.2, timeoutSeconds: 5, failureThreshold: 2}\n"


async def test_a_full_group_queues_requests_instead_of_shedding_them():
    """A burst of 12 against 4 seats (each request 0.5 s at the apiserver): all served
    by their group, none shed, since each waits less than maxQueueWaitSeconds (3 s by
    default) for a seat."""
    stack = await Stack().start(
        extra=SLOW_PROBES + "overload: {maxInflight: 4, reservedPercent: 0, exempt: []}\n")
    try:
        stack.sim.groups["pod"].faults.latency = 0.5
        client = await stack.client()
        responses = await asyncio.gather(
            *(client.request("GET", "/api/v1/pods", timeout=10) for _ in range(12)))
        assert [(r.status, r.group) for r in responses] == [(200, "pod")] * 12
        assert shed(stack, "pod", "inflight") == 0
        assert stack.gateway.admission.queued == 0
    finally:
        await stack.close()


async def test_requests_left_waiting_past_the_queue_wait_get_429():
    stack = await Stack().start(extra=SLOW_PROBES + (
        "overload: {maxInflight: 4, maxQueueWaitSeconds: 0.2, reservedPercent: 0, exempt: []}\n"))
    try:
        stack.sim.groups["pod"].faults.latency = 1.0
        client = await stack.client()
        responses = await asyncio.gather(
            *(client.request("GET", "/api/v1/pods", timeout=10) for _ in range(8)))
        assert sorted(r.status for r in responses) == [200] * 4 + [429] * 4
        for response in responses:
            if response.status == 429:
                assert_too_many_requests(response)
        assert shed(stack, "pod", "inflight") == 4
        admission = stack.gateway.admission
        assert (admission.queued, admission.inflight["pod"]) == (0, 0)
    finally:
        await stack.close()


async def test_a_stalled_exempt_client_starves_no_one():
    """An exempt client (here by User-Agent) with ten LISTs it never reads holds no seat
    of the group: a normal client beside it is never shed. Its unread responses are held
    to its buffered-bytes budget, and the stalled-reader timeout cuts it off like anyone."""
    budget = 100_000
    stack = await started(
        "overload: {maxInflight: 4, reservedPercent: 0, exempt: [{userAgent: \"admin/*\"}],"
        f" perClient: {{maxInflight: 6, maxBufferedBytes: {budget}}}}}\n"
        "limits: {stalledWriteTimeoutSeconds: 3}\n")
    try:
        client = await stack.client()
        body = json.dumps({"metadata": {"name": "big"}, "data": {"k": "v" * 400_000}}).encode()
        created = await client.request("POST", "/api/v1/namespaces/default/configmaps", body=body)
        assert created.status == 201
        raw = await RawH2.connect(stack.port)
        raw.conn.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 0})
        for _ in range(10):
            raw.send("/api/v1/namespaces/default/configmaps", user_agent=b"admin/1.0")
        admission = stack.gateway.admission
        for _ in range(100):
            await asyncio.sleep(0.05)
            if admission.exempt.get("config") == 10:
                break
        assert admission.exempt.get("config") == 10  # in flight, and stalled
        # the normal client: every request answered, none shed
        responses = await asyncio.gather(*(
            client.request("GET", "/api/v1/namespaces/default/configmaps") for _ in range(4)))
        assert [r.status for r in responses] == [200] * 4  # the limit, all its own
        assert shed(stack, "config", "inflight") == 0
        # the exempt reader's unread bytes are counted against its own budget: past it,
        # the group is credited no more for it, and its requests beyond its client's
        # seats (perClient.maxInflight) wait their turn, unshed, pulling no window
        key = "addr:127.0.0.1|admin"
        window = stack.gateway.holder.current.config.http2_upstream.initial_stream_window
        held = admission.buffers.buffered.get(key, 0)
        assert budget <= held <= budget + 6 * window, held
        assert (admission.buffers.seated[key], admission.buffers.waiting(key)) == (6, 4)
        assert shed(stack, "config", "client-inflight") == 0
        goaway = await raw.until_closed(15)
        assert goaway.additional_data == b"stalled-reader"
        assert admission.exempt.get("config", 0) == 0
        assert admission.buffers.buffered.get(key, 0) == 0
        assert not admission.buffers.seated and not admission.buffers.waiting(key)
    finally:
        await stack.close()


async def test_a_nodes_heartbeats_are_never_shed_and_an_unverified_clients_are_shed_last(pki):
    """Over TLS, as kubelets connect: the heartbeats of a client whose certificate the
    gateway verified take seats past a full group, up to their allowance; a bearer-token
    client's (which may mint identities) use the reserve and are shed past the limit."""
    tls = server_ssl_context(str(pki.server_cert), str(pki.server_key), str(pki.ca))
    stack = await Stack().start(extra=FAST_HEALTH + "overload: {maxInflight: 5, "
                                "maxQueueWaitSeconds: 0, reservedPercent: 40, exempt: []}\n",
                                tls=tls)  # fmt: skip
    try:
        stack.sim.groups["config"].faults.latency = 1.0
        kubelet_tls = ssl.create_default_context(cafile=str(pki.ca))
        kubelet_tls.load_cert_chain(str(pki.kubelet_cert), str(pki.kubelet_key))
        kubelet_tls.set_alpn_protocols(["h2"])
        token_tls = ssl.create_default_context(cafile=str(pki.ca))
        token_tls.set_alpn_protocols(["h2"])
        kubelet = await stack.client(tls=kubelet_tls)  # system:node:node-1
        other = await stack.client(tls=token_tls)
        bearer = [(b"authorization", b"Bearer token-ci")]
        slow = [other.open("GET", "/api/v1/nodes", headers=bearer) for _ in range(3)]
        await asyncio.sleep(0.1)  # 3 of 5 - 40%: ordinary requests are held there
        assert_too_many_requests(await other.request("GET", "/api/v1/configmaps", headers=bearer))
        reserve = other.open("GET", LEASE, headers=bearer)  # the token's: from the reserve
        beats = [kubelet.open("PUT", LEASE, user_agent=f"kubelet-{i}/v1.31.0", body=b"{}")
                 for i in range(4)]  # 8 in flight: past the whole limit, admitted
        await asyncio.sleep(0.1)
        assert_too_many_requests(await kubelet.request("GET", LEASE))  # a fifth: ordinary
        assert_too_many_requests(await other.request("GET", LEASE, headers=bearer))  # past 5
        for collector in (*beats, reserve):
            await collector.done
            assert (collector.response().status, collector.response().group) == (404, "config")
        for collector in slow:
            await collector.done
        lease = await kubelet.request("GET", LEASE, user_agent="kubelet/v1.31.0")
        assert (lease.status, lease.group) == (404, "config")
    finally:
        await stack.close()


async def test_rate_limit_rule_answers_429_with_the_wait():
    stack = await started("""overload:
  rateLimits:
    - name: operator-lists
      match: {userAgent: "my-operator/*", verbs: [list]}
      qps: 0.5
      burst: 2
""")
    try:
        client = await stack.client()
        statuses = []
        for _ in range(3):
            r = await client.request("GET", "/api/v1/configmaps", user_agent="my-operator/v1")
            statuses.append(r.status)
        assert statuses == [200, 200, 429]
        assert int(r.headers[b"retry-after"]) == 2  # 1 token at 0.5 qps
        assert "operator-lists" in r.json()["message"]
        other = await client.request("GET", "/api/v1/configmaps", user_agent="kubectl/v1.31")
        assert other.status == 200
        assert shed(stack, "config", "rate-limit") == 1
    finally:
        await stack.close()


async def test_watch_limit():
    stack = await started("overload: {maxWatches: 1}\n")
    try:
        client = await stack.client()
        first = client.open("GET", "/api/v1/pods?watch=1")
        await first.got_headers.wait()
        assert_too_many_requests(await client.request("GET", "/api/v1/pods?watch=1"))
        first.stream.cancel()
        await asyncio.sleep(0.1)
        again = client.open("GET", "/api/v1/pods?watch=1")
        await again.got_headers.wait()
        assert again.status == 200
        again.stream.cancel()
    finally:
        await stack.close()


async def read_until(raw: RawH2, wanted, timeout: float = 5) -> list[h2.events.Event]:
    """Events until `wanted(events so far)` is true."""
    seen: list[h2.events.Event] = []
    async with asyncio.timeout(timeout):
        while not wanted(seen):
            got = await raw.events()
            if not got:
                break
            seen += got
    return seen


def goaways(events) -> list[int]:
    return [e.last_stream_id for e in events if isinstance(e, h2.events.ConnectionTerminated)]


def ended(events) -> set[int]:
    return {e.stream_id for e in events if isinstance(e, h2.events.StreamEnded)}


async def test_load_goaway_is_two_phase_and_loses_nothing():
    """At full load every HTTP/2 request triggers GOAWAY (chance 1): the client sees
    GOAWAY(max id) + PING, then GOAWAY(real last id); every stream it opened before that
    is answered; it reconnects for the rest."""
    stack = await started("goaway: {chance: 1, maxChance: 1}\n")
    try:
        stack.gateway.update_load()
        raw = await RawH2.connect(stack.port)
        ids = [raw.send("/api/v1/nodes") for _ in range(5)]
        events = await read_until(raw, lambda ev: len(goaways(ev)) == 2 and ended(ev) >= set(ids))
        first, final = goaways(events)
        assert first == MAX_STREAM_ID and final == ids[-1]
        assert any(isinstance(e, h2.events.PingReceived) and e.ping_data == GOAWAY_PING
                   for e in events)
        statuses = {e.stream_id: dict(e.headers)[b":status"] for e in events
                    if isinstance(e, h2.events.ResponseReceived)}
        assert statuses == dict.fromkeys(ids, b"200")
        assert await read_until(raw, lambda ev: False) == []  # then the server closes
        again = await RawH2.connect(stack.port)
        sid = again.send("/api/v1/nodes")
        assert sid in ended(await read_until(again, lambda ev: sid in ended(ev)))
        sample = stack.gateway.metrics.registry.get_sample_value
        assert sample("kom_gateway_goaways_sent_total", {"reason": "load"}) == 2
    finally:
        await stack.close()


async def test_a_watch_sent_with_the_goaway_ping_ack_is_kept():
    """A request the client sent right behind its ACK of the GOAWAY's PING, read in the
    same batch, is under the final GOAWAY's last stream id and so accepted: a watch
    opened that way runs on (Go's client marks the connection dead on the first GOAWAY,
    but a request that had already taken it still goes out). Found by the cluster
    load model: the connection was closed by the linger begun when the ACK found no
    stream open, and the watch broke one second later."""
    stack = await started("goaway: {chance: 1, maxChance: 1}\n")
    try:
        stack.gateway.update_load()
        raw = await RawH2.connect(stack.port)
        first = raw.send("/api/v1/nodes")  # triggers GOAWAY(max) + PING
        seen: list[h2.events.Event] = []
        async with asyncio.timeout(5):
            while not (first in ended(seen) and any(
                    isinstance(e, h2.events.PingReceived) for e in seen)):
                data = await raw.reader.read(65536)
                assert data
                seen += raw.conn.receive_data(data)  # the PING ACK queued, not sent
        watch = raw.send("/api/v1/namespaces/default/configmaps?watch=1")  # one write
        events = await read_until(raw, lambda ev: len(goaways(seen + ev)) == 2)
        assert goaways(seen + events) == [MAX_STREAM_ID, watch]
        await asyncio.sleep(GOAWAY_LINGER_SECONDS + 0.3)  # the linger would have closed
        client = await stack.client()
        body = b'{"metadata": {"name": "after-the-linger"}}'
        created = await client.request("POST", "/api/v1/namespaces/default/configmaps", body=body)
        assert created.status == 201
        events = await read_until(raw, lambda ev: any(
            isinstance(e, h2.events.DataReceived) and b"after-the-linger" in e.data for e in ev))
        assert any(isinstance(e, h2.events.DataReceived) and e.stream_id == watch
                   and b"after-the-linger" in e.data for e in events)  # not closed
        assert watch not in ended(events)
    finally:
        await stack.close()


async def test_goaway_chance_rises_with_inflight_load():
    stack = await started("overload: {maxInflight: 4, maxQueueWaitSeconds: 0, reservedPercent: 0}\n"
                          "goaway: {chance: 0.001, maxChance: 0.02, softLoad: 0.5}\n")
    try:
        stack.gateway.update_load()
        assert stack.gateway.load == 0 and stack.gateway.intake.goaway_chance == 0.001
        stack.sim.groups["pod"].faults.latency = 0.5
        client = await stack.client()
        slow = [client.open("GET", "/api/v1/pods") for _ in range(3)]
        await asyncio.sleep(0.1)
        stack.gateway.update_load()
        assert stack.gateway.load == 0.75
        stack.gateway.metrics.flush()  # gauges are set as a scrape reads them
        assert stack.gateway.metrics.registry.get_sample_value(
            "kom_gateway_inflight_requests", {"group": "pod", "kind": "short"}) == 3
        assert stack.gateway.intake.goaway_chance == pytest.approx(0.001 + 0.019 * 0.5)
        for collector in slow:
            await collector.done
        stack.gateway.update_load()
        assert stack.gateway.intake.goaway_chance == 0.001
    finally:
        await stack.close()


async def test_max_connection_age_goaway_keeps_the_running_watch():
    stack = await started("goaway: {maxConnectionAgeSeconds: 0.5, maxConnectionAgeJitter: 0}\n")
    try:
        raw = await RawH2.connect(stack.port)
        watch = raw.send("/api/v1/namespaces/default/configmaps?watch=1")
        events = await read_until(raw, lambda ev: len(goaways(ev)) == 2)
        assert goaways(events) == [MAX_STREAM_ID, watch]
        assert watch not in ended(events)
        client = await stack.client()  # an event after the GOAWAY still reaches the watch
        body = b'{"metadata": {"name": "after-goaway"}}'
        created = await client.request("POST", "/api/v1/namespaces/default/configmaps", body=body)
        assert created.status == 201
        events = await read_until(raw, lambda ev: any(
            isinstance(e, h2.events.DataReceived) and b"after-goaway" in e.data for e in ev))
        assert not goaways(events)  # never a second GOAWAY
    finally:
        await stack.close()


async def test_drain_lets_requests_finish_and_ends_watches_cleanly():
    stack = await started("")
    try:
        stack.sim.groups["pod"].faults.latency = 0.5
        client = await stack.client()
        watch = client.open("GET", "/api/v1/namespaces/default/configmaps?watch=1")
        await watch.got_headers.wait()
        slow = client.open("GET", "/api/v1/pods")
        await asyncio.sleep(0.1)
        await drain(stack.gateway, stack.listener, RunOptions("unused", drain_seconds=3))
        assert slow.status == 200 and not slow.reset and slow.done.done()
        assert watch.done.done() and not watch.reset  # ended, not broken: clients re-watch
        assert client.conn.closed  # GOAWAY, then closed once empty
        sample = stack.gateway.metrics.registry.get_sample_value
        assert sample("kom_gateway_goaways_sent_total", {"reason": "drain"}) == 1
    finally:
        await stack.close()


async def test_drain_answers_the_first_request_of_a_connection_accepted_just_before():
    """An HTTP/1.1 connection accepted a moment before the drain, its request not yet
    read, is not idle: its first request is answered (with Connection: close), as Go's
    Shutdown does, instead of being dropped (a restart in place under a load that opens
    a connection per request saw empty answers)."""
    stack = await started("")
    try:
        fresh = await asyncio.open_connection("127.0.0.1", stack.port)
        await asyncio.sleep(0.2)  # accepted; nothing sent yet
        stack.listener.goaway_all("drain")
        fresh[1].write(b"GET /api/v1/nodes HTTP/1.1\r\nHost: gw\r\nUser-Agent: t/1\r\n\r\n")
        answer = await asyncio.wait_for(fresh[0].read(), 5)  # then closed
        assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
        assert b"Connection: close" in answer.split(b"\r\n\r\n")[0]
    finally:
        await stack.close()


async def test_reload_applies_new_limits_to_the_next_request(tmp_path):
    stack = await started("overload: {maxInflight: 1, maxQueueWaitSeconds: 0, reservedPercent: 0, exempt: []}\n")
    try:
        stack.sim.groups["pod"].faults.latency = 0.5
        client = await stack.client()
        slow = client.open("GET", "/api/v1/pods")
        await asyncio.sleep(0.1)
        assert_too_many_requests(await client.request("GET", "/api/v1/pods"))
        ports = {name: g.port for name, g in stack.sim.groups.items()}
        path = tmp_path / "gw.yaml"
        path.write_text(config_text(ports, EVERYONE_CUT_OVER, "overload: {maxInflight: 5, maxQueueWaitSeconds: 0}\n"))
        assert (await stack.gateway.reload(str(path))).applied
        assert (await client.request("GET", "/api/v1/pods")).status == 200
        await slow.done
        assert stack.gateway.admission.inflight["pod"] == 0
    finally:
        await stack.close()


async def test_simulated_capacity_queues_requests():
    """The simulator's `capacity` fault: with latency L and capacity 1, three requests at
    once take about L, 2L and 3L (a saturated apiserver), which the benchmark relies on;
    a readiness probe beside them takes L, as kube-apiserver's APF exempts probes."""
    stack = await started("")
    try:
        faults = stack.sim.groups["config"].faults
        faults.latency, faults.capacity = 0.2, 1
        client = await stack.client()
        loop = asyncio.get_running_loop()
        start = loop.time()
        finished = []

        async def one() -> None:
            assert (await client.request("GET", "/api/v1/nodes")).status == 200
            finished.append(loop.time() - start)

        probed = []

        async def probe() -> None:  # straight to the apiserver, as the gateway's probes
            sim = await H2ClientConnection.connect(
                "127.0.0.1", stack.sim.groups["config"].port, H2ClientSettings())
            try:
                assert (await Client(sim, 0).request("GET", "/readyz")).status == 200
                probed.append(loop.time() - start)
            finally:
                sim.close()

        await asyncio.gather(one(), one(), one(), probe())
        first, second, third = sorted(finished)
        assert first >= 0.2 and second >= 0.4 and third >= 0.6  # one at a time...
        assert second - first >= 0.18 and third - second >= 0.18  # ...each after the last
        assert 0.2 <= probed[0] < 0.5  # its latency, not a place in the queue (APF: exempt)
    finally:
        await stack.close()


async def test_least_in_flight_and_a_returning_endpoint_gets_traffic_at_once():
    """A group of two apiservers: requests spread by in-flight count; one taken down
    leaves all traffic on the other (watches included); when it comes back it gets the
    new requests at once, instead of everything staying on the survivor."""
    stack = Stack()
    try:
        for name in ("default", "pod-a", "pod-b"):
            await stack.sim.add_group(name, "127.0.0.1", 0)
        port = {name: g.port for name, g in stack.sim.groups.items()}
        text = (f'groups:\n  default: {{endpoints: ["http://127.0.0.1:{port["default"]}"]}}\n'
                f'  pod:\n    endpoints: ["http://127.0.0.1:{port["pod-a"]}", '
                f'"http://127.0.0.1:{port["pod-b"]}"]\n    resources: [pods]\n'
                + 'cutover:\n  - percent: {pod: 100}\n' + FAST_HEALTH)
        stack.gateway = Gateway(ConfigHolder(load_config_text(text)))
        stack.listener = new_listener(stack.gateway, None)
        stack.port = await stack.listener.start("127.0.0.1", 0)
        client = await stack.client()

        async def groups_of(count: int) -> list[str]:
            return [(await client.request("GET", "/api/v1/pods")).group for _ in range(count)]

        assert sorted(await groups_of(4)) == ["pod-a", "pod-a", "pod-b", "pod-b"]  # in turn
        for name in ("pod-a", "pod-b"):
            stack.sim.groups[name].faults.latency = 0.3
        burst = await asyncio.gather(*(client.request("GET", "/api/v1/pods") for _ in range(10)))
        assert sorted(r.group for r in burst) == ["pod-a"] * 5 + ["pod-b"] * 5

        await stack.sim.set_down("pod-b", True)
        await asyncio.sleep(0.8)  # probes eject it
        watches = [client.open("GET", "/api/v1/pods?watch=1") for _ in range(4)]
        for watch in watches:
            await watch.got_headers.wait()
        assert {w.headers[b"x-kom-sim-group"] for w in watches} == {b"pod-a"}
        assert set(await groups_of(3)) == {"pod-a"}

        await stack.sim.set_down("pod-b", False)
        await asyncio.sleep(0.8)  # a probe passes
        assert set(await groups_of(3)) == {"pod-b"}  # at once: pod-a still holds 4 watches
        for watch in watches:
            watch.stream.cancel()
    finally:
        await stack.close()


async def test_http2_settings_from_the_yaml_reach_both_sides():
    stack = await started("""http2:
  downstream: {initialStreamWindowBytes: 100000, maxFrameSizeBytes: 32768,
               connectionWindowBytes: 10000000, pingIntervalSeconds: 0.3}
  upstream: {initialStreamWindowBytes: 131072, maxConcurrentStreams: 2,
             connectionWindowBytes: 5000000}
""")
    try:
        raw = await RawH2.connect(stack.port)
        events = await read_until(raw, lambda ev: any(
            isinstance(e, h2.events.PingReceived) for e in ev), timeout=3)
        (settings,) = [e for e in events if isinstance(e, h2.events.RemoteSettingsChanged)]
        advertised = {code: c.new_value for code, c in settings.changed_settings.items()}
        assert advertised[h2.settings.SettingCodes.INITIAL_WINDOW_SIZE] == 100000
        assert advertised[h2.settings.SettingCodes.MAX_FRAME_SIZE] == 32768
        assert raw.conn.outbound_flow_control_window == 10000000
        # the PING came after 0.3 s of silence (raw answered it, so the link stays up)

        client = await stack.client()
        slow = stack.sim.groups["pod"].faults
        slow.latency = 0.3
        await asyncio.gather(*(client.request("GET", "/api/v1/pods") for _ in range(5)))
        (endpoint,) = stack.gateway.upstreams.groups["pod"]
        assert len(endpoint.connections) >= 3  # at most 2 streams each: 5 at once need 3
        upstream = endpoint.connections[0]
        assert upstream.local_stream_window() == 131072
        assert upstream.receive_window() >= 5000000 - 131072 * 2
    finally:
        await stack.close()
