"""Hostile input never hurts the gateway: HTTP/2 abuse is detected and cut off (GOAWAY
ENHANCE_YOUR_CALM, counted), limits answer with Kubernetes Status errors, malformed
requests get clean 400s, and other clients keep being served throughout."""

from __future__ import annotations

import asyncio
import json
import urllib.request
from pathlib import Path

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
import pytest
from e2e import Cluster
from harness import FAST_HEALTH, REQUEST, RawH2, Stack
from hyperframe.frame import ContinuationFrame, HeadersFrame

pytestmark = pytest.mark.usefixtures("engine")  # both HTTP/2 engines


def abuse(stack: Stack, kind: str) -> float:
    return stack.gateway.metrics.registry.get_sample_value(
        "kom_gateway_http2_abuse_total", {"kind": kind}) or 0


def rejected(stack: Stack, reason: str) -> float:
    return stack.gateway.metrics.registry.get_sample_value(
        "kom_gateway_client_connections_rejected_total", {"reason": reason}) or 0


async def still_serving(stack: Stack) -> None:
    client = await stack.client()
    assert (await client.request("GET", "/api/v1/nodes")).status == 200


@pytest.fixture
async def stack():
    s = await Stack().start(extra=FAST_HEALTH + "limits: {stalledWriteTimeoutSeconds: 0.5}\n")
    yield s
    await s.close()


async def test_made_up_resources_share_one_metrics_label(stack):
    """A client cannot mint metric series with made-up paths: their resource label is
    one, and a resource an apiserver served keeps its own."""
    from kom_gateway.proxy.outcome import UNVERIFIED

    client = await stack.client()
    for i in range(50):
        assert (await client.request("GET", f"/apis/example.com/v1/made-up-{i}")).status == 404
    assert (await client.request("GET", "/api/v1/nodes")).status == 200
    metrics = stack.gateway.metrics
    metrics.flush()
    resources = {s.labels["resource"] for family in metrics.registry.collect()
                 if family.name == "kom_gateway_requests" for s in family.samples}  # fmt: skip
    assert resources == {UNVERIFIED, "nodes"}


async def test_rapid_reset_is_cut_off(stack):
    raw = await RawH2.connect(stack.port)
    raw.rapid_reset(1000)
    goaway = await raw.until_closed()
    assert goaway.error_code == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM
    assert goaway.additional_data == b"rapid-reset"
    assert abuse(stack, "rapid-reset") == 1
    assert abuse(stack, "protocol-error") == 0  # one flood, counted once
    await still_serving(stack)
    await asyncio.sleep(0.2)
    assert not stack.gateway.exchanges  # every exchange the resets started is gone


@pytest.mark.parametrize(("flood", "kind"), [
    (lambda c, i: c.ping(i.to_bytes(8, "big")), "ping-flood"),
    (lambda c, i: c.update_settings({h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: 100 + i}),
     "settings-flood"),
    (lambda c, i: c.increment_flow_control_window(1), "control-frame-flood"),
])
async def test_control_frame_floods_are_cut_off(stack, flood, kind):
    raw = await RawH2.connect(stack.port)
    for i in range(30000 if kind == "control-frame-flood" else 300):
        flood(raw.conn, i)
    raw.flush()
    goaway = await raw.until_closed()
    assert goaway.error_code == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM
    assert goaway.additional_data == kind.encode()
    assert abuse(stack, kind) == 1
    assert abuse(stack, "protocol-error") == 0  # one flood, counted once
    await still_serving(stack)


async def test_continuation_flood_is_cut_off(stack):
    raw = await RawH2.connect(stack.port)
    frames = HeadersFrame(1, b"\x82").serialize()  # no END_HEADERS: CONTINUATION follows
    frames += b"".join(ContinuationFrame(1, b"\x00" * 16).serialize() for _ in range(200))
    raw.writer.write(frames)
    goaway = await raw.until_closed()
    assert goaway is not None and goaway.error_code == h2.errors.ErrorCodes.PROTOCOL_ERROR
    assert abuse(stack, "continuation-flood") == 1
    await still_serving(stack)


async def test_a_reader_that_never_opens_its_window_is_cut_off(stack):
    client = await stack.client()
    body = json.dumps({"metadata": {"name": "big"}, "data": {"k": "v" * 200_000}}).encode()
    assert (await client.request("POST", "/api/v1/namespaces/default/configmaps", body=body)).status == 201
    raw = await RawH2.connect(stack.port)
    raw.conn.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 0})
    raw.conn.send_headers(1, REQUEST, end_stream=True)
    raw.flush()
    goaway = await raw.until_closed()
    assert goaway.additional_data == b"stalled-reader"
    assert abuse(stack, "stalled-reader") == 1
    await still_serving(stack)


async def test_connections_per_address_are_limited():
    s = await Stack().start(extra=FAST_HEALTH + "limits: {maxConnectionsPerAddress: 2}\n")
    try:
        first, _second = await s.client(), await s.client()
        raw = await RawH2.connect(s.port)  # the third, over HTTP/2
        goaway = await raw.until_closed()
        assert goaway.error_code == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM
        assert b"too many connections" in goaway.additional_data
        reader, writer = await asyncio.open_connection("127.0.0.1", s.port)  # over HTTP/1.1
        writer.write(b"GET /api/v1/nodes HTTP/1.1\r\nHost: gw\r\n\r\n")
        status, headers, body = await read_h1(reader)
        assert status == 429 and headers["retry-after"] == "1"
        assert json.loads(body)["reason"] == "TooManyRequests"
        assert rejected(s, "per-address-limit") == 2
        await first.close()
        for _ in range(100):
            if s.listener.per_address.get("127.0.0.1", 0) < 2:
                break
            await asyncio.sleep(0.02)
        await still_serving(s)  # a freed slot is usable again
    finally:
        await s.close()


async def read_h1(reader) -> tuple[int, dict[str, str], bytes]:
    async with asyncio.timeout(10):
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
        body = await reader.readexactly(int(headers.get("content-length", 0)))
    return int(lines[0].split()[1]), headers, body


async def test_slow_and_idle_clients_are_closed():
    s = await Stack().start(extra=FAST_HEALTH + (
        "limits: {headerReadTimeoutSeconds: 0.3, idleTimeoutSeconds: 0.3}\n"))
    try:
        async def closed_by_server(payload: bytes) -> bool:
            reader, writer = await asyncio.open_connection("127.0.0.1", s.port)
            writer.write(payload)
            async with asyncio.timeout(5):
                data = await reader.read()
            writer.close()
            return data == b""

        assert await closed_by_server(b"")  # says nothing at all
        assert await closed_by_server(b"GET /api/v1/pods HTTP/1.1\r\nHost: x\r\n")  # slowloris
        assert rejected(s, "header-timeout") == 1  # (the second was already HTTP/1.1)
        reader, writer = await asyncio.open_connection("127.0.0.1", s.port)  # HTTP/1.1 keep-alive
        writer.write(b"GET /api/v1/nodes HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await read_h1(reader))[0] == 200
        async with asyncio.timeout(5):
            assert await reader.read() == b""  # idle after its response: closed
        writer.close()

        raw = await RawH2.connect(s.port)  # HTTP/2, idle after one request
        raw.conn.send_headers(1, REQUEST, end_stream=True)
        raw.flush()
        goaway = await raw.until_closed()
        assert goaway.error_code == h2.errors.ErrorCodes.NO_ERROR
        await still_serving(s)
    finally:
        await s.close()


async def test_every_keep_alive_request_gets_the_header_deadline_not_the_idle_timeout():
    s = await Stack().start(extra=FAST_HEALTH + (
        "limits: {headerReadTimeoutSeconds: 0.3, idleTimeoutSeconds: 60}\n"))
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", s.port)
        writer.write(b"GET /api/v1/nodes HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await read_h1(reader))[0] == 200
        await asyncio.sleep(0.6)  # idle between requests: the idle timeout's business
        writer.write(b"GET /api/v1/pods HTTP/1.1\r\nHost: x\r\n")  # ...and never ends
        async with asyncio.timeout(5):  # far below the 60 s idle timeout
            assert await reader.read() == b""
        writer.close()
        # a slow body is not a slow header: only the headers have the deadline
        reader, writer = await asyncio.open_connection("127.0.0.1", s.port)
        body = b'{"metadata":{"name":"slow"}}'
        writer.write(b"POST /api/v1/namespaces HTTP/1.1\r\nHost: x\r\n"
                     b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body))
        writer.write(body[:5])
        await asyncio.sleep(0.6)
        writer.write(body[5:])
        assert (await read_h1(reader))[0] == 201
        writer.close()
    finally:
        await s.close()


@pytest.mark.parametrize(("request_bytes", "status"), [
    (b"BLAH\x00 / HTTP/1.1\r\n\r\n", 400),
    (b"GET /api/v1/pods\x01 HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    (b"GET /api/v1/pods HTTP/1.1\r\nHost: x\r\nBad Header: y\r\n\r\n", 400),
    (b"GET /api/v1/pods HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n", 400),
    (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 431),
    (b"GET / HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-%d: %s\r\n" % (i, b"v" * 200)
                                               for i in range(60)) + b"\r\n", 431),
    (b"GET / HTTP/1.1\r\nHost: x\r\n" + b"X: y\r\n" * 150 + b"\r\n", 400),
])
async def test_malformed_http1_gets_a_status_error(request_bytes, status):
    s = await Stack().start(extra=FAST_HEALTH + "limits: {maxHeaderBytes: 8192}\n")
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", s.port)
        writer.write(request_bytes)
        got, headers, body = await read_h1(reader)
        writer.close()
        assert got == status
        assert headers["content-type"].startswith("application/json")
        doc = json.loads(body)
        assert (doc["kind"], doc["code"]) == ("Status", status)
        assert "Traceback" not in doc["message"] and "aiohttp" not in doc["message"]
        await still_serving(s)
    finally:
        await s.close()


@pytest.mark.parametrize("target", [
    "/api/v1/namespaces/%ff%fe/pods",  # percent-encoded invalid UTF-8
    "/api/v1/namespaces/d\xe9j\xe0/pods",  # raw latin-1 bytes
    "/api/v1/pods?labelSelector=" + "a%3D1," * 20000,  # an absurd selector
    "/api/v1/pods?" + "&".join(f"k{i}=v" for i in range(20000)),  # an absurd query
    "/api/v1/namespaces/a%zz/pods",  # a bad escape
    "/apis/%2e%2e/%2e%2e/etc/passwd",
])
async def test_odd_targets_never_cause_a_server_error(stack, target):
    client = await stack.client()
    got = await client.request("GET", target)
    assert got.status < 500, got.body[:200]
    if got.status == 400:
        assert got.json()["kind"] == "Status"
    reader, writer = await asyncio.open_connection("127.0.0.1", stack.port)
    writer.write(b"GET " + target.encode("latin-1") + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    status, _, _ = await read_h1(reader)
    writer.close()
    assert status < 500


async def test_oversized_http2_header_list_gets_431_on_its_stream_only():
    """As kube-apiserver: a header list over the limit is answered 431 with a Status on
    its own stream; the connection and the client's other requests carry on."""
    s = await Stack().start(extra=FAST_HEALTH + "limits: {maxHeaderBytes: 8192}\n")
    try:
        c = await s.client()
        big = [(b"x-big-%d" % i, b"v" * 1000) for i in range(20)]  # 20 KB in 20 fields
        r = await c.request("GET", "/api/v1/nodes", headers=big)
        assert r.status == 431 and r.json()["reason"] == "RequestHeaderFieldsTooLarge"
        r = await c.request("GET", "/api/v1/nodes")  # same connection
        assert (r.status, r.group) == (200, "config")
        assert abuse(s, "protocol-error") == 0
    finally:
        await s.close()


@pytest.mark.parametrize("problem", [
    [(b"X-Upper", b"v")],  # upper-case name
    [(b"x-bad", b"a\r\nb")],  # CR/LF in a value
    [(b"x-nul", b"a\x00b")],  # NUL in a value
    [(b"connection", b"keep-alive")],  # connection-specific
    [(b"te", b"gzip")],  # te other than trailers
])
async def test_malformed_request_resets_only_its_stream(stack, problem):
    """RFC 9113 8.1.1: a malformed request is a stream error (RST_STREAM
    PROTOCOL_ERROR), as nghttp2 and Go answer it; the connection keeps serving."""
    reset, answered = await _first_reset_second_answered(stack, [*REQUEST, *problem])
    assert reset == h2.errors.ErrorCodes.PROTOCOL_ERROR
    assert answered == b"200"


async def _first_reset_second_answered(stack, headers):
    """Send `headers` on stream 1 and a good request on stream 3 of one connection: how
    stream 1 ended (its reset's error code, or its status) and stream 3's status."""
    raw = await RawH2.connect(stack.port)
    raw.conn.send_headers(1, headers, end_stream=True)
    raw.conn.send_headers(3, REQUEST, end_stream=True)
    raw.flush()
    first, answered = None, None
    async with asyncio.timeout(5):
        while answered is None or first is None:
            for event in await raw.events():
                if isinstance(event, h2.events.StreamReset) and event.stream_id == 1:
                    first = event.error_code
                elif isinstance(event, h2.events.ResponseReceived):
                    status = dict(event.headers)[b":status"]
                    if event.stream_id == 1:
                        first = status
                    else:
                        answered = status
    raw.writer.close()
    return first, answered


@pytest.mark.parametrize("path", [b"api/v1/nodes", b"*", b"http://gw/api/v1/nodes"])
async def test_a_path_that_is_not_absolute_resets_its_stream_on_both_engines(stack, path):
    """RFC 9113 8.3.1: `:path` is an absolute path ("*" only for OPTIONS): otherwise the
    request is malformed, a stream error, whichever engine (nghttp2 judges it itself)."""
    bad = [(n, path if n == b":path" else v) for n, v in REQUEST]
    reset, answered = await _first_reset_second_answered(stack, bad)
    assert reset == h2.errors.ErrorCodes.PROTOCOL_ERROR
    assert answered == b"200"


async def test_connect_gets_400(stack):
    raw = await RawH2.connect(stack.port)
    raw.conn.send_headers(1, [(b":method", b"CONNECT"), (b":authority", b"example:443")],
                          end_stream=True)
    raw.flush()
    status = None
    async with asyncio.timeout(5):
        while status is None:
            for event in await raw.events():
                if isinstance(event, h2.events.ResponseReceived):
                    status = dict(event.headers)[b":status"]
    assert status == b"400"
    raw.writer.close()


def test_gateway_memory_stays_bounded_under_every_abuse(tmp_path):
    """A real gateway process, flooded again and again with every abuse above plus
    stalled readers of a large LIST: its memory levels off and it keeps serving."""
    if not Path("/proc/self/status").exists():
        pytest.skip("needs /proc")
    cluster = Cluster(tmp_path, extra="limits: {stalledWriteTimeoutSeconds: 1}\n")
    try:
        big = json.dumps({"metadata": {"name": "big"}, "data": {"k": "v" * 500_000}}).encode()
        urllib.request.urlopen(urllib.request.Request(
            f"http://127.0.0.1:{cluster.port}/api/v1/namespaces/kube-system/configmaps",
            data=big, method="POST", headers={"Content-Type": "application/json"}), timeout=10)

        BULK = [*REQUEST[:3], (b":path", b"/api/v1/namespaces/kube-system/configmaps"),
                (b"user-agent", b"raw/1.0")]

        async def round_of_abuse() -> None:
            async def rapid_reset():
                raw = await RawH2.connect(cluster.port)
                raw.rapid_reset(600)
                await raw.until_closed(20)

            async def continuation():
                raw = await RawH2.connect(cluster.port)
                raw.writer.write(HeadersFrame(1, b"\x82").serialize() + b"".join(
                    ContinuationFrame(1, b"\x00" * 16384).serialize() for _ in range(80)))
                await raw.until_closed(20)

            async def pings():
                raw = await RawH2.connect(cluster.port)
                for i in range(2000):
                    raw.conn.ping(i.to_bytes(8, "big"))
                raw.flush()
                await raw.until_closed(20)

            async def stalled():
                raw = await RawH2.connect(cluster.port)
                raw.conn.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 0})
                for _ in range(10):
                    raw.conn.send_headers(raw.conn.get_next_available_stream_id(), BULK,
                                          end_stream=True)
                raw.flush()
                await raw.until_closed(20)

            await asyncio.gather(*(f() for f in (rapid_reset, continuation, pings)
                                   for _ in range(3)), *(stalled() for _ in range(5)))

        asyncio.run(round_of_abuse())  # warm-up: imports, caches, pools
        before = cluster.gateway_rss()
        for _ in range(4):
            asyncio.run(round_of_abuse())
        growth = cluster.gateway_rss() - before
        assert growth < 30 * 1024 * 1024, f"gateway RSS grew {growth / 2**20:.1f} MiB"
        with urllib.request.urlopen(f"http://127.0.0.1:{cluster.port}/api/v1/nodes", timeout=10) as r:
            assert r.status == 200
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{cluster.admin}/metrics",
                                         timeout=10).read().decode()
        for kind in ("rapid-reset", "continuation-flood", "ping-flood", "stalled-reader"):
            assert f'kom_gateway_http2_abuse_total{{kind="{kind}"}}' in metrics
    finally:
        cluster.stop()
