"""The data plane against simulated groups, in process, on real 127.0.0.1 sockets."""

import asyncio
import dataclasses
import json

import aiohttp
import pytest
from harness import FAST_HEALTH, Collector, Stack

from kom_gateway.proxy import gateway as gateway_module
from kom_gateway.proxy.metrics import MULTIPROC_ENV

pytestmark = pytest.mark.usefixtures("engine")  # both HTTP/2 engines


POD = json.dumps({"metadata": {"name": "p1"}, "spec": {"containers": [{"name": "c", "image": "x"}]}}).encode()


async def wait_for(event: asyncio.Event, seconds: float = 10) -> None:
    """Every wait in these tests is bounded: a stall fails, it never hangs CI."""
    async with asyncio.timeout(seconds):
        await event.wait()


@pytest.fixture
async def stack():
    s = await Stack().start()
    yield s
    await s.close()


async def make_stack(cutover=None, extra=FAST_HEALTH):
    s = Stack()
    return await (s.start(extra=extra) if cutover is None else s.start(cutover, extra))


async def test_requests_land_on_their_groups(stack):
    c = await stack.client()
    created = await c.request("POST", "/api/v1/namespaces/default/pods", body=POD)
    assert (created.status, created.group) == (201, "pod")
    cm = json.dumps({"metadata": {"name": "cm1"}, "data": {"a": "b"}}).encode()
    assert (await c.request("POST", "/api/v1/namespaces/default/configmaps", body=cm)).group == "config"
    ev = json.dumps({"metadata": {"name": "e1"}, "reason": "x"}).encode()
    assert (await c.request("POST", "/apis/events.k8s.io/v1/namespaces/default/events", body=ev)).group == "event"
    assert (await c.request("GET", "/api/v1/namespaces/default/events")).group == "event"
    assert (await c.request("GET", "/apis/apps/v1/deployments")).group == "default"
    assert (await c.request("GET", "/version")).group == "default"
    # rule 0 pins legacy/* clients to default (no percent)
    legacy = await c.request("GET", "/api/v1/namespaces/default/pods/p1", user_agent="legacy/1")
    assert (legacy.status, legacy.group) == (200, "default")
    assert legacy.json()["metadata"]["name"] == "p1"  # one shared store


async def test_completed_requests_are_counted_with_their_status(stack):
    c = await stack.client()
    assert (await c.request("GET", "/api/v1/nodes")).status == 200
    assert (await c.request("GET", "/api/v1/nodes/missing")).status == 404
    await asyncio.sleep(0.05)
    stack.gateway.metrics.flush()  # the hot path's counters are batched
    requests = stack.gateway.metrics.requests
    assert requests.labels("config", "list", "nodes", "", "200")._value.get() == 1
    assert requests.labels("config", "get", "nodes", "", "404")._value.get() == 1
    assert requests.labels("config", "list", "nodes", "", "499")._value.get() == 0


async def test_request_bodies_sent_upstream_are_counted_per_group(stack):
    c = await stack.client()
    cm = json.dumps({"metadata": {"name": "counted"}, "data": {"k": "v" * 1000}}).encode()
    assert (await c.request("POST", "/api/v1/namespaces/default/configmaps", body=cm)).status == 201
    sent = stack.gateway.metrics.sent_bytes.labels("config")
    assert sent._value.get() == 0  # batched, as every hot-path counter
    stack.gateway.metrics.flush()
    assert sent._value.get() == len(cm)


@pytest.mark.parametrize("worker", [False, True])
async def test_batched_counters_reach_prometheus_on_a_timer_only_in_a_worker(
    stack, monkeypatch, worker
):
    """One process flushes before a scrape reads (admin.py), so no timer pays for it;
    a worker's counters must reach the files its supervisor reads by themselves."""
    if worker:
        monkeypatch.setenv(MULTIPROC_ENV, "set")  # (the metrics' mode is fixed at import)
    else:
        monkeypatch.delenv(MULTIPROC_ENV, raising=False)
    monkeypatch.setattr(gateway_module, "METRICS_FLUSH_SECONDS", 0.01)
    stack.gateway.start_load_sampling(lambda: 0, interval=0.01)
    c = await stack.client()
    assert (await c.request("GET", "/api/v1/nodes")).status == 200
    await asyncio.sleep(0.2)
    counted = stack.gateway.metrics.requests.labels("config", "list", "nodes", "", "200")
    assert counted._value.get() == (1 if worker else 0)
    stack.gateway.metrics.flush()
    assert counted._value.get() == 1


async def test_client_going_away_cancels_upstream(stack):
    c = await stack.client()
    watch = c.open("GET", "/api/v1/namespaces/default/pods?watch=1")
    await wait_for(watch.got_headers)
    assert stack.gateway.metrics.watches.labels("pod")._value.get() == 1
    watch.stream.cancel()
    for _ in range(50):
        if not stack.store_watchers():
            break
        await asyncio.sleep(0.05)
    assert not stack.store_watchers()  # the simulator's watch was cancelled too
    assert stack.gateway.metrics.watches.labels("pod")._value.get() == 0
    stack.gateway.metrics.flush()
    assert stack.gateway.metrics.requests.labels("pod", "watch", "pods", "", "200")._value.get() == 1


async def test_http11_clients_are_routed_and_streamed(stack):
    async with aiohttp.ClientSession(headers={"User-Agent": "kubectl/v1.31"}) as session:
        base = f"http://127.0.0.1:{stack.port}"
        async with session.post(f"{base}/api/v1/namespaces/default/pods", data=POD,
                                headers={"Content-Type": "application/json"}) as r:
            assert (r.status, r.headers["X-Kom-Sim-Group"]) == (201, "pod")
        async with session.get(f"{base}/api/v1/nodes") as r:
            assert (r.status, r.headers["X-Kom-Sim-Group"]) == (200, "config")
        async with session.get(f"{base}/api/v1/namespaces/default/pods?watch=1&timeoutSeconds=1") as r:
            assert r.headers["X-Kom-Sim-Group"] == "pod"
            first = json.loads(await r.content.readline())
            assert (first["type"], first["object"]["metadata"]["name"]) == ("ADDED", "p1")


async def group_down(stack, group):
    """Take a group down and wait until the gateway has seen its connections drop:
    a request sent on a connection the peer is resetting may have been processed, and
    is rightly answered 503 rather than replayed."""
    await stack.sim.set_down(group, True)
    endpoint = stack.gateway.upstreams.groups[group][0]
    async with asyncio.timeout(5):
        while not all(conn.closed for conn in endpoint.connections):
            await asyncio.sleep(0.01)


async def test_group_down_falls_back_to_default_and_recovers(stack):
    c = await stack.client()
    endpoint = stack.gateway.upstreams.groups["pod"][0]
    endpoint._prober.cancel()  # a request, not a probe, is to find pod down (connect-error)
    await group_down(stack, "pod")
    for _ in range(3):
        r = await c.request("POST", "/api/v1/namespaces/default/pods",
                            body=json.dumps({"metadata": {"generateName": "p-"}}).encode())
        assert (r.status, r.group) == (201, "default")  # writes too: nothing reached pod
    fallbacks = stack.gateway.metrics.fallbacks
    assert fallbacks.labels("pod", "default", "connect-error")._value.get() >= 1
    await stack.sim.set_down("pod", False)
    health = stack.gateway.holder.current.config.health
    endpoint.start_probing(health.interval, health.timeout)  # its probe brings it back
    for _ in range(50):
        if stack.gateway.upstreams.groups["pod"][0].healthy:
            break
        await asyncio.sleep(0.1)
    assert (await c.request("GET", "/api/v1/pods")).group == "pod"


async def test_default_down_answers_503_with_retry_after(stack):
    c = await stack.client()
    await group_down(stack, "default")
    r = await c.request("GET", "/apis/apps/v1/deployments")
    assert (r.status, r.headers[b"retry-after"]) == (503, b"1")
    assert r.json()["kind"] == "Status" and r.json()["code"] == 503


async def test_refused_streams_are_retried_on_default_any_verb(stack):
    c = await stack.client()
    stack.sim.groups["pod"].faults.refuse_streams = True
    r = await c.request("POST", "/api/v1/namespaces/default/pods", body=POD)
    assert (r.status, r.group) == (201, "default")
    assert stack.gateway.metrics.fallbacks.labels("pod", "default", "refused")._value.get() == 1


async def test_failure_after_sending_retries_reads_but_not_writes(stack):
    c = await stack.client()
    # this test is about the retry policy: keep health probes (which meet the same
    # fault) from ejecting pod between the two requests
    health = stack.gateway.upstreams.groups["pod"][0].health
    health.policy = dataclasses.replace(health.policy, failure_threshold=100,
                                        consecutive_failures=100)
    stack.sim.groups["pod"].faults.reset_before_headers = True
    read = await c.request("GET", "/api/v1/pods")
    assert (read.status, read.group) == (200, "default")
    write = await c.request("POST", "/api/v1/namespaces/default/pods", body=POD)
    assert (write.status, write.headers[b"retry-after"]) == (503, b"1")
    assert write.json()["reason"] == "ServiceUnavailable"
    # the write was not replayed anywhere
    assert stack.sim.groups["default"].served["create pods"] == 0
    assert stack.sim.groups["pod"].served["create pods"] == 0  # reset before it was handled


async def test_upstream_429_and_410_pass_through(stack):
    c = await stack.client()
    stack.sim.groups["pod"].faults.throttle = 1.0
    stack.sim.groups["pod"].faults.retry_after = 7
    r = await c.request("GET", "/api/v1/pods")
    assert (r.status, r.group, r.headers[b"retry-after"]) == (429, "pod", b"7")
    stack.sim.groups["pod"].faults.throttle = 0.0
    watch = await c.request("GET", "/api/v1/pods?watch=1&resourceVersion=1")
    assert (watch.status, watch.group) == (200, "pod")
    event = json.loads(watch.body)
    assert (event["type"], event["object"]["code"], event["object"]["reason"]) == ("ERROR", 410, "Expired")
    assert not stack.gateway.metrics.fallbacks._metrics


async def test_list_broken_mid_body_is_reset_not_truncated(stack):
    c = await stack.client()
    await c.request("POST", "/api/v1/namespaces/default/pods", body=POD)
    stack.sim.groups["pod"].faults.reset_mid_body = True
    r = await c.request("GET", "/api/v1/pods")
    assert r.status == 200 and r.reset
    assert stack.gateway.metrics.broken_responses.labels("pod", "list")._value.get() == 1
    assert not stack.gateway.metrics.fallbacks._metrics  # nothing moved to another group


async def test_watch_ends_cleanly_when_its_group_dies_then_rewatch_lands_on_default(stack):
    c = await stack.client()
    watch = c.open("GET", "/api/v1/namespaces/default/pods?watch=1&allowWatchBookmarks=true")
    await wait_for(watch.got_headers)
    assert watch.headers[b"x-kom-sim-group"] == b"pod"
    await stack.sim.set_down("pod", True)
    async with asyncio.timeout(5):
        await watch.done
    assert not watch.reset  # clean end: the client re-watches
    assert stack.gateway.metrics.broken_responses.labels("pod", "watch")._value.get() == 1
    again = c.open("GET", "/api/v1/namespaces/default/pods?watch=1")
    await wait_for(again.got_headers)
    assert again.headers[b"x-kom-sim-group"] == b"default"
    again.stream.cancel()


async def test_upstream_goaway_lets_running_watch_finish(stack):
    c = await stack.client()
    watch = c.open("GET", "/api/v1/namespaces/default/pods?watch=1")
    await wait_for(watch.got_headers)
    for protocol in list(stack.sim.groups["pod"].listener.h2_connections):
        protocol.goaway()  # graceful: last stream id = the watch's
    await asyncio.sleep(0.1)
    created = await c.request("POST", "/api/v1/namespaces/default/pods", body=POD)
    assert (created.status, created.group) == (201, "pod")  # on a new upstream connection
    for _ in range(50):
        if watch.chunks:
            break
        await asyncio.sleep(0.05)
    event = json.loads(b"".join(watch.chunks).splitlines()[0])
    assert (event["type"], event["object"]["metadata"]["name"]) == ("ADDED", "p1")
    assert not watch.done.done()
    watch.stream.cancel()


async def test_upstream_goaway_chance_loses_nothing(stack):
    c = await stack.client()
    config = stack.sim.groups["config"]
    config.faults.goaway_chance = 0.05  # kube-apiserver allows up to 0.02
    results = []
    for _ in range(10):
        results += await asyncio.gather(*(c.request("GET", "/api/v1/nodes") for _ in range(20)))
    assert {r.status for r in results} == {200}
    # a GOAWAY'd stream is retried on fresh connections to the same group (as Go does);
    # only one GOAWAY'd over and over falls back to default
    assert sum(r.group == "config" for r in results) >= 190
    assert stack.gateway.upstreams.groups["config"][0].healthy  # routine, not ill health


async def test_timeout_and_body_limit():
    stack = await make_stack(extra=FAST_HEALTH + "timeouts: {requestSeconds: 0.3}\n"
                             "limits: {maxRequestBodyBytes: 1000}\n")
    try:
        c = await stack.client()
        stack.sim.groups["config"].faults.latency = 2
        slow = await c.request("GET", "/api/v1/nodes")
        assert (slow.status, slow.json()["reason"]) == (504, "Timeout")
        # long-running requests have no timeout
        watch = c.open("GET", "/api/v1/nodes?watch=1")
        await asyncio.sleep(0.6)
        assert not watch.done.done()
        watch.stream.cancel()
        big = json.dumps({"metadata": {"name": "big"}, "data": {"x": "y" * 2000}}).encode()
        tooBig = await c.request("POST", "/api/v1/namespaces/default/secrets", body=big)
        assert (tooBig.status, tooBig.json()["reason"]) == (413, "RequestEntityTooLarge")
        await asyncio.sleep(0.1)
        assert not stack.gateway.exchanges  # the refused exchange does not linger
    finally:
        await stack.close()


async def test_stalled_reader_stalls_only_itself_and_buffers_little(stack):
    c = await stack.client()
    blob = "x" * 400_000
    for i in range(8):  # ~3.2 MB of configmaps in one LIST
        body = json.dumps({"metadata": {"name": f"big{i}"}, "data": {"blob": blob}}).encode()
        assert (await c.request("POST", "/api/v1/namespaces/default/configmaps", body=body)).status == 201
    stalled = c.open("GET", "/api/v1/namespaces/default/configmaps", collector=Collector(auto_ack=False))
    await wait_for(stalled.got_data)
    await asyncio.sleep(0.3)
    # other streams on the same client connection, and on the same upstream connection
    other = await stack.client()
    for client in (c, other):
        async with asyncio.timeout(2):
            r = await client.request("GET", "/api/v1/namespaces/default/configmaps/big0")
        assert (r.status, r.group) == (200, "config")
    # the gateway holds only what the upstream window let through for the stalled stream
    buffered = sum(p.buffered_bytes() for p in stack.listener.h2_connections)
    assert buffered <= 256 * 1024 + 16384
    received = sum(map(len, stalled.chunks))
    assert received <= 256 * 1024
    stalled.auto_ack = True
    stalled.stream.ack(stalled.unacked)
    async with asyncio.timeout(10):
        await stalled.done
    assert len(stalled.response().json()["items"]) == 8


async def test_a_proxied_request_leaves_no_cyclic_garbage(stack):
    """Exchange, attempt, streams and upstream streams let each other go when a request
    ends, so reference counting frees them: the cyclic collector (a few µs of CPU per
    request when it has to find them) finds nothing of the gateway's per request. (An
    earlier test's gateway may be freed meanwhile: only a type left once per request or
    more counts.)"""
    import gc
    from collections import Counter

    client = await stack.client()
    for path in ("/api/v1/namespaces/default/configmaps", "/api/v1/pods", "/version"):
        assert (await client.request("GET", path)).status == 200
    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        for _ in range(20):
            for path in ("/api/v1/namespaces/default/configmaps", "/api/v1/pods", "/version"):
                assert (await client.request("GET", path)).status == 200
        gc.collect()
        ours = Counter(type(o).__qualname__ for o in gc.garbage
                       if type(o).__module__.startswith(("kom_gateway.proxy", "kom_gateway.http")))  # fmt: skip
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    assert {name: n for name, n in ours.items() if n >= 20} == {}


class _ContinueFirst(asyncio.Protocol):
    """An apiserver that answers 100 Continue before its response, as Go's HTTP/2 server
    does to a request carrying `Expect: 100-continue` (/readyz answered plainly)."""

    def connection_made(self, transport):
        import h2.config
        import h2.connection

        self.transport = transport
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
        self.conn.initiate_connection()
        self.paths = {}
        transport.write(self.conn.data_to_send())

    def data_received(self, data):
        import h2.events

        for event in self.conn.receive_data(data):
            if isinstance(event, h2.events.RequestReceived):
                self.paths[event.stream_id] = dict(event.headers)[b":path"]
                if self.paths[event.stream_id] != b"/readyz":
                    self.conn.send_headers(event.stream_id, [(b":status", b"100")])
            elif isinstance(event, h2.events.DataReceived):
                self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, h2.events.StreamEnded):
                body = b"ok" if self.paths[event.stream_id] == b"/readyz" else b'{"kind":"ConfigMap"}'
                status = b"200" if body == b"ok" else b"201"
                self.conn.send_headers(event.stream_id, [(b":status", status),
                                                         (b"content-length", b"%d" % len(body))])
                self.conn.send_data(event.stream_id, body, end_stream=True)
        self.transport.write(self.conn.data_to_send())


async def test_a_final_response_after_100_continue_is_the_answer(engine):
    """The upstream's 1xx is not the answer and not a failure: the final response after
    it reaches the client (on nghttp2 that final HEADERS is not filed as a response)."""
    from harness import Client

    from kom_gateway.config import ConfigHolder, load_config_text
    from kom_gateway.http.h2.client import H2ClientConnection
    from kom_gateway.http.settings import H2ClientSettings
    from kom_gateway.proxy.gateway import Gateway
    from kom_gateway.server.run import new_listener

    loop = asyncio.get_running_loop()
    upstream = await loop.create_server(_ContinueFirst, "127.0.0.1", 0)
    port = upstream.sockets[0].getsockname()[1]
    gateway = Gateway(ConfigHolder(load_config_text(
        f'groups:\n  default: {{endpoints: ["http://127.0.0.1:{port}"]}}\n')))
    listener = new_listener(gateway, None)
    try:
        gateway_port = await listener.start("127.0.0.1", 0)
        conn = await H2ClientConnection.connect("127.0.0.1", gateway_port, H2ClientSettings())
        client = Client(conn, gateway_port)
        response = await client.request("POST", "/api/v1/namespaces/default/configmaps",
                                         body=b'{"kind":"ConfigMap"}',
                                         headers=[(b"expect", b"100-continue")])
        assert (response.status, response.body) == (201, b'{"kind":"ConfigMap"}')
        await client.close()
    finally:
        gateway.abort_all()
        await listener.close()
        await gateway.close()
        upstream.close()
