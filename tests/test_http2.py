"""HTTP/2 connection behaviour: keepalive PINGs and upstream pool growth."""

import asyncio
import json
import socket
import time

import h2.config
import h2.connection
import h2.settings
import pytest
from harness import Collector, Stack

from kom_gateway.http.h2.client import H2ClientConnection
from kom_gateway.http.listener import Listener
from kom_gateway.http.settings import H2ClientSettings, H2ServerSettings
from kom_gateway.http.transport import KEEPALIVE_PING, H2Transport

pytestmark = pytest.mark.usefixtures("engine")  # both HTTP/2 engines


async def test_server_pings_silent_clients_and_closes_dead_ones():
    listener = Listener(lambda stream: stream.end(),
                        h2_settings=H2ServerSettings(ping_interval=0.2, ping_timeout=0.3))
    port = await listener.start("127.0.0.1", 0)
    try:
        # a live client: h2 answers PINGs, so its connection stays open
        live = await H2ClientConnection.connect("127.0.0.1", port, H2ClientSettings(ping_interval=3600))
        # a dead one: speaks the preface, then never reads (a half-open peer)
        dead = socket.create_connection(("127.0.0.1", port))
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        conn.initiate_connection()
        dead.sendall(conn.data_to_send())
        await asyncio.sleep(1.2)
        assert not live.closed
        dead.settimeout(2)
        received = b""
        while chunk := await asyncio.to_thread(dead.recv, 65536):
            received += chunk  # settings, PING ... then EOF: the gateway closed it
        assert b"komgw" in received  # our PING payload went out before it gave up
        live.close()
        dead.close()
    finally:
        await listener.close()


async def test_pool_opens_connections_as_upstream_stream_limit_is_reached():
    stack = await Stack(sim_h2_settings=H2ServerSettings(max_concurrent_streams=4)).start()
    try:
        c = await stack.client()
        watches = [c.open("GET", "/api/v1/namespaces/default/pods?watch=1") for _ in range(10)]
        async with asyncio.timeout(10):
            for w in watches:
                await w.got_headers.wait()
        assert {w.status for w in watches} == {200}
        pod = stack.gateway.upstreams.groups["pod"][0]
        open_conns = [conn for conn in pod.connections if not conn.closed]
        assert len(open_conns) >= 3  # 10 watches, at most 4 streams per connection
        assert all(len(conn.streams) <= 4 for conn in open_conns)
        for w in watches:
            w.stream.cancel()
    finally:
        await stack.close()


def test_advertised_limits_are_applied_to_our_own_parser():
    from kom_gateway.http.h2.conn import make_connection

    conn = make_connection(client_side=True, max_concurrent_streams=10, initial_window=65535,
                           max_frame_size=256 * 1024, max_header_list_size=1 << 20)
    assert conn.local_settings.max_frame_size == 256 * 1024
    assert conn.max_inbound_frame_size == 256 * 1024  # h2 alone would keep 16 KiB
    assert conn.decoder.max_header_list_size == 1 << 20  # ...and 64 KiB here


async def test_large_header_blocks_up_to_the_advertised_limit_pass(engine):
    stack = await Stack().start()
    try:
        c = await stack.client()
        # ~1 MB in 20 fields: over h2's 64 KiB default list size, under our 1 MiB
        big = [(b"x-large-%d" % i, b"v" * 50_000) for i in range(20)]
        r = await c.request("GET", "/api/v1/nodes", headers=big)
        assert (r.status, r.group) == (200, "config")
        # one field of 100 KB: h2 takes it; nghttp2 caps one field at 64 KiB (a compile-time
        # HPACK limit, as in Envoy and curl), and ends only that client's connection
        r = await c.request("GET", "/api/v1/nodes", headers=[(b"x-large", b"v" * 100_000)])
        if engine == "h2":
            assert (r.status, r.group) == (200, "config")
        else:
            assert r.reset and r.status == 0
        other = await stack.client()
        assert (await other.request("GET", "/api/v1/nodes")).status == 200
    finally:
        await stack.close()


async def test_a_client_leaving_with_data_queued_returns_the_upstream_window():
    """Data queued for a client that then leaves is never sent, but the credit it holds
    on the shared upstream connection must come back; otherwise every such client
    shrinks that connection's window for good until all its streams stall (found by the
    abuse test: stalled readers cut off one after another)."""
    stack = await Stack().start()
    try:
        client = await stack.client()
        body = json.dumps({"metadata": {"name": "big"}, "data": {"k": "v" * 1_500_000}}).encode()
        assert (await client.request("POST", "/api/v1/namespaces/default/configmaps",
                                     body=body)).status == 201
        for leave in ("reset", "disconnect"):
            reader = await stack.client()
            stalled = reader.open("GET", "/api/v1/namespaces/default/configmaps",
                                  collector=Collector(auto_ack=False))
            async with asyncio.timeout(10):
                await stalled.got_data.wait()
            await asyncio.sleep(0.3)  # upstream has sent a window's worth; most of it waits
            if leave == "reset":
                stalled.stream.cancel()
            else:
                await reader.close()
            await asyncio.sleep(0.3)
            for endpoint in stack.gateway.upstreams.groups["config"]:
                for conn in endpoint.connections:
                    assert conn.unreturned_bytes() == 0, leave  # nothing unaccounted
        assert (await client.request("GET", "/api/v1/namespaces/default/configmaps")).status == 200
    finally:
        await stack.close()


class _Member(H2Transport):
    """A connection as the clock sees it: what it pinged, whether it closed."""

    def __init__(self, name: str, ticks: list[str] | None = None, fail: bool = False) -> None:
        super().__init__()
        self._loop = asyncio.get_running_loop()
        self.name, self.ticks, self.fail = name, ticks, fail
        self.pings: list[bytes] = []
        self.closed = False

    def _on_tick(self, now: float) -> None:
        if self.fail:
            raise RuntimeError("a bug in one connection")
        if self.ticks is not None:
            self.ticks.append(self.name)
        else:
            super()._on_tick(now)

    def _send_ping(self, payload: bytes) -> None:
        self.pings.append(payload)

    def _data_to_send(self) -> bytes:
        return b""

    def close(self) -> None:
        self.closed = True

    def _peer_name(self) -> str:
        return self.name


async def test_one_clock_ticks_every_connection_of_a_loop_and_goes_with_the_last():
    """Keepalive and timeouts share one timer per loop (not one timer and one task per
    connection). Each firing checks one slice of the connections, so every connection
    is checked once per tick without one long pause; a connection that raises does not
    stop the others' checks."""
    from kom_gateway.http import transport

    loop = asyncio.get_running_loop()
    ticks: list[str] = []
    members = [_Member(f"c{i}", ticks) for i in range(15)]
    members.insert(5, _Member("bug", fail=True))
    for member in members:
        member._start_clock(0, 0, tick=0.04)
    clock = transport._CLOCKS[loop]
    assert all(m._clock is clock for m in members) and clock.tick == 0.04

    def fire_by_hand() -> None:
        assert clock._handle is not None
        clock._handle.cancel()
        clock._fire()

    fire_by_hand()
    assert len(ticks) == 2  # 16 connections, 8 slices
    for _ in range(transport.CLOCK_SLICES - 1):
        fire_by_hand()
    # each once (the one that raised stopped nobody)
    assert sorted(ticks) == sorted(f"c{i}" for i in range(15))
    ticks.clear()
    for _ in range(200):  # and on its own timer
        if len(ticks) >= 30:
            break
        await asyncio.sleep(0.01)
    assert len(ticks) >= 30
    for member in members:
        member._stop_transport_timers()
    assert loop not in transport._CLOCKS and clock._handle is None
    tiny = _Member("tiny", ticks)
    tiny._start_clock(0.0001, 0.0001)  # valid YAML, absurd: the clock still does not spin
    assert transport._CLOCKS[loop].tick == transport.CLOCK_MIN_TICK
    tiny._stop_transport_timers()


async def test_keepalive_pings_a_silent_peer_and_closes_when_it_does_not_answer():
    """On the clock's ticks (given times): silent for the interval, one PING; its ACK
    resets the wait; no ACK within the timeout, the connection closes."""
    silent = _Member("peer")
    silent._start_clock(30.0, 15.0)
    silent.transport = FakeTransport()
    silent._last_read = 100.0
    silent._on_tick(129.0)
    assert silent.pings == []
    silent._on_tick(130.0)
    silent._on_tick(131.0)  # one PING outstanding at a time
    assert silent.pings == [KEEPALIVE_PING] and not silent.closed
    silent._keepalive_acked()
    silent._last_read = 131.5
    silent._on_tick(160.0)
    assert silent.pings == [KEEPALIVE_PING] and not silent.closed  # heard 28.5 s ago
    silent._on_tick(161.5)
    silent._on_tick(176.0)
    assert len(silent.pings) == 2 and not silent.closed
    silent._on_tick(176.5)
    assert silent.closed  # 15 s without the ACK
    silent._stop_transport_timers()


class FakeTransport:
    def is_closing(self) -> bool:
        return False


@pytest.mark.parametrize("engine", ["nghttp2", "h2"])
@pytest.mark.parametrize("how", ["timeout", "cancelled"])
async def test_a_connect_given_up_after_connection_made_leaves_nothing_behind(engine, how):
    """connect() gives up on an upstream that accepts TCP but never sends SETTINGS (its
    timeout, or the caller cancelled): the half-made connection is aborted and leaves
    the loop's clock, and no flush of it runs later, instead of lingering (it used to
    keep its socket open; and a cancelled connect's transport, closed by the loop under
    it, later failed a flush with "the handler is closed")."""
    from kom_gateway.http import engine as engines
    from kom_gateway.http import transport
    from kom_gateway.http.client import ConnectError

    if engine == "nghttp2" and engines.nghttp2_missing() is not None:
        pytest.skip("nghttp2 engine not built")
    client_class = engines.select(engine).client
    loop = asyncio.get_running_loop()
    errors: list[dict] = []
    loop.set_exception_handler(lambda _loop, context: errors.append(context))
    accepted: list[asyncio.StreamReader] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(reader)

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        assert loop not in transport._CLOCKS  # no other connection on this loop
        if how == "timeout":
            with pytest.raises(ConnectError):
                await client_class.connect("127.0.0.1", port, H2ClientSettings(connect_timeout=0.3))
        else:
            task = asyncio.ensure_future(client_class.connect("127.0.0.1", port, H2ClientSettings()))
            while loop not in transport._CLOCKS:  # connection_made joined the clock
                await asyncio.sleep(0.005)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        assert loop not in transport._CLOCKS  # it left the clock (the last member)
        # the upstream saw the preface, then the end of the connection
        assert (await asyncio.wait_for(accepted[0].read(), 5)).startswith(b"PRI * HTTP/2.0")
        await asyncio.sleep(0.05)
        assert errors == []  # no flush or tick of it failed later
    finally:
        loop.set_exception_handler(None)
        server.close()
        await server.wait_closed()


class _RecordingTransport:
    """Enough of a transport for a server connection driven by hand."""

    def __init__(self) -> None:
        self.written = bytearray()
        self.closed = False

    def get_extra_info(self, name: str, default: object = None) -> object:
        return ("127.0.0.1", 1) if name == "peername" else default

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def write(self, data: bytes) -> None:
        self.written += data

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True


@pytest.mark.parametrize("engine", ["nghttp2", "h2"])
@pytest.mark.parametrize("window", [65535, 0], ids=["open-window", "zero-window"])
async def test_only_data_the_window_holds_back_makes_a_stalled_reader(engine, window):
    """The stalled-reader timeout is for a client that leaves our data waiting. A
    response written a moment before the connection clock's tick, its flush still to
    come in the same loop pass, is not waiting for the client: in a reconnect storm, when
    every pass is long, a tick can find such data every time, and a kubelet reading
    normally was cut off as a stalled reader (the nghttp2 engine counted whatever it
    held unframed). Data the client's window blocks is waiting, and is cut off."""
    from kom_gateway.http import engine as engines

    if engine == "nghttp2" and engines.nghttp2_missing() is not None:
        pytest.skip("nghttp2 engine not built")
    served = []

    def respond(stream) -> None:
        stream.start_response(200, [(b"content-type", b"application/json")])
        stream.write(b"x" * 100)  # queued: the flush runs later in this loop pass
        served.append(stream)

    settings = H2ServerSettings(stalled_write_timeout=5.0)
    server = engines.select(engine).server(respond, settings)
    transport = _RecordingTransport()
    server.connection_made(transport)
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    client.initiate_connection()
    client.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: window})
    client.send_headers(1, [(":method", "GET"), (":scheme", "https"), (":authority", "x"),
                            (":path", "/api/v1/nodes")], end_stream=True)  # fmt: skip
    server.data_received(client.data_to_send())
    try:
        if window == 0:  # framed and flushed: what is left waits for the client's window
            await asyncio.sleep(0)
            await asyncio.sleep(0)
        assert served
        start = time.monotonic()
        server._on_tick(start)
        server._on_tick(start + 3.0)
        server._on_tick(start + 6.0)
        assert transport.closed == (window == 0), (engine, window)
    finally:
        server.connection_lost(None)
