"""Upstream HTTP/2 client connections (gateway -> apiserver), whatever the engine.

- Honours the server's MAX_CONCURRENT_STREAMS (`has_capacity`), so the pool opens more
  connections rather than queueing on a full one.
- GOAWAY is graceful: streams at or below last-stream-id keep flowing (watches keep
  running); those above it are reported as refused, so the caller retries them; no new
  stream is opened and the connection closes when the last one ends.
- Response DATA is acknowledged only when the caller says so (after the client took it):
  a stalled client holds back its own stream only, since the connection window is sized
  for every stream's window at once.
- PING keepalive: after `ping_interval` without any frame from the server, PING; no ACK
  within `ping_timeout` closes the connection (and fails its streams).

An engine (`h2/client.py`, `nghttp2/client.py`) subclasses `HTTP2ClientConnection` with the
frame-level primitives; the pool (`proxy/upstreams.py`) and the exchange see only this.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from typing import ClassVar, Protocol, cast

from mypy_extensions import mypyc_attr

from kom_gateway.http import events as ev
from kom_gateway.http.events import EngineEvent
from kom_gateway.http.settings import H2ClientSettings
from kom_gateway.http.stream import Flushed, Headers
from kom_gateway.http.transport import REFUSED_STREAM, H2Transport

log = logging.getLogger(__name__)

RESET_GOAWAY = "goaway"  # above the server's GOAWAY last-stream-id: not processed
RESET_REFUSED = "refused"  # RST_STREAM(REFUSED_STREAM) before a response: not processed
RESET_BROKEN = "broken"  # anything else: the request may have been processed


class StreamListener(Protocol):
    def on_response(self, status: int, headers: Headers) -> None: ...
    def on_data(self, data: bytes, flow_len: int) -> None: ...
    def on_end(self) -> None: ...
    def on_reset(self, kind: str, reason: str) -> None:
        """kind: RESET_GOAWAY / RESET_REFUSED (not processed) or RESET_BROKEN."""


class _NoListener:
    """What a stream listens with once its connection has let it go: nothing more can
    arrive, and dropping the listener frees it (and what it holds) by reference
    counting, without waiting for the cyclic garbage collector."""

    def on_response(self, status: int, headers: Headers) -> None:
        pass

    def on_data(self, data: bytes, flow_len: int) -> None:
        pass

    def on_end(self) -> None:
        pass

    def on_reset(self, kind: str, reason: str) -> None:
        pass


NO_LISTENER = _NoListener()


class ConnectError(Exception):
    """Could not establish the upstream connection (nothing was sent)."""


class StreamRefused(Exception):
    """The connection could not open a stream (it is going away): nothing was sent."""


class ClientStream:
    """One request on an upstream connection."""

    __slots__ = ("_conn", "end_when_flushed", "listener", "pending", "responded", "stream_id")

    def __init__(
        self, conn: HTTP2ClientConnection, stream_id: int, listener: StreamListener
    ) -> None:
        self._conn = conn
        self.stream_id = stream_id
        self.listener = listener
        self.pending: object = None  # the engine's queue of body data, if it keeps one
        self.end_when_flushed = False
        self.responded = False

    def send_data(self, data: bytes, on_flushed: Flushed | None = None) -> None:
        self._conn.send_data(self, data, on_flushed)

    def end(self) -> None:
        self._conn.end_stream(self)

    def ack(self, flow_len: int) -> None:
        self._conn.ack(self.stream_id, flow_len)

    def cancel(self) -> None:
        self._conn.cancel(self.stream_id)


@mypyc_attr(allow_interpreted_subclasses=True)  # the h2 / HTTP/1.1 engines extend it
class HTTP2ClientConnection(H2Transport):
    engine: ClassVar[str] = ""  # (ClassVar: see HTTP2ServerConnection)
    # what the engine raises while the connection is being set up
    setup_errors: ClassVar[tuple[type[BaseException], ...]] = ()

    def __init__(self, settings: H2ClientSettings) -> None:
        super().__init__()
        self.settings = settings
        self.streams: dict[int, ClientStream] = {}
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.closed = False
        self.draining = False  # GOAWAY received (or sent): no new streams
        self._max_streams = 0  # streams we may have open (known once SETTINGS arrive)
        self._paused = False
        self._last_read = time.monotonic()

    @classmethod
    async def connect(
        cls,
        host: str,
        port: int,
        settings: H2ClientSettings,
        ssl_context: ssl.SSLContext | None = None,
        server_hostname: str | None = None,
    ) -> HTTP2ClientConnection:
        loop = asyncio.get_running_loop()
        failures: tuple[type[BaseException], ...] = (OSError, TimeoutError, *cls.setup_errors)
        made: list[HTTP2ClientConnection] = []

        def make() -> HTTP2ClientConnection:
            made.append(conn := cls(settings))
            return conn

        try:
            async with asyncio.timeout(settings.connect_timeout):
                _, protocol = await loop.create_connection(
                    make,
                    host,
                    port,
                    ssl=ssl_context,
                    server_hostname=server_hostname if ssl_context else None,
                )
                await protocol.ready
        except BaseException as exc:
            for conn in made:  # timed out, cancelled or refused after connection_made
                conn.abandon()
            if isinstance(exc, failures):  # (ssl.SSLError is an OSError)
                raise ConnectError(f"{host}:{port}: {exc or type(exc).__name__}") from exc
            raise
        if ssl_context is not None:
            assert protocol.transport is not None
            ssl_object = protocol.transport.get_extra_info("ssl_object")
            if ssl_object is None or ssl_object.selected_alpn_protocol() != "h2":
                protocol.close()
                raise ConnectError(f"{host}:{port}: server did not negotiate HTTP/2 (ALPN h2)")
        return protocol

    # -- engine primitives ---------------------------------------------------------------
    def _start(self) -> None:
        """Queue the preface and our SETTINGS; open the connection window."""
        raise NotImplementedError

    def _remote_max_streams(self) -> int:
        raise NotImplementedError

    def open_stream(
        self, headers: Headers, end_stream: bool, listener: StreamListener
    ) -> ClientStream:
        """Open a stream (caller checked has_capacity()); StreamRefused if it cannot."""
        raise NotImplementedError

    def send_data(self, stream: ClientStream, data: bytes, on_flushed: Flushed | None) -> None:
        raise NotImplementedError

    def end_stream(self, stream: ClientStream) -> None:
        raise NotImplementedError

    def ack(self, stream_id: int, flow_len: int) -> None:
        raise NotImplementedError

    def cancel(self, stream_id: int) -> None:
        raise NotImplementedError

    # -- flow-control state, for tests and diagnosis --------------------------------------
    def receive_window(self) -> int:
        """Connection-level DATA the server may still send before our next WINDOW_UPDATE."""
        raise NotImplementedError

    def local_stream_window(self) -> int:
        """The initial stream window we advertised (as acknowledged)."""
        raise NotImplementedError

    def unreturned_bytes(self) -> int:
        """DATA received but not yet credited back (its reader has not taken it)."""
        raise NotImplementedError

    # -- capacity ----------------------------------------------------------------------
    def has_capacity(self) -> bool:
        return (
            not self.closed
            and not self.draining
            and len(self.streams) < self._max_streams
            and self.ready.done()
        )

    # -- asyncio.Protocol ----------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self._loop = asyncio.get_running_loop()
        s = self.settings
        self.transport.set_write_buffer_limits(high=s.write_buffer_bytes)
        self._start()
        self._write_out()
        self._start_clock(s.ping_interval, s.ping_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(str(exc) if exc else "connection closed"))
            self.ready.exception()  # connect() re-raises it; nobody else needs to
        self._stop_transport_timers()
        streams, self.streams = self.streams, {}
        self._closed()
        for stream in streams.values():
            stream.listener.on_reset(RESET_BROKEN, "upstream connection lost")

    def _closed(self) -> None:
        """The transport is gone: free what the engine holds."""

    def abandon(self) -> None:
        """`connect` gave up on this connection after its `connection_made` ran (the
        connect timed out or was cancelled while SETTINGS were awaited, or a cancelled
        connect closed the transport under it, which calls no `connection_lost`): no
        flush or tick may touch the transport any more, and a live one is aborted."""
        self.closed = True
        self._stop_transport_timers()
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.abort()

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        self._resumed()

    def _resumed(self) -> None:
        self._write_out()

    # -- what the server did ---------------------------------------------------------------
    def _handle(self, events: list[EngineEvent]) -> None:
        """Act on what the server sent, in order (either engine's events); one
        listener's failure is logged and the rest go on."""
        streams = self.streams
        for event in events:
            try:
                kind = event.kind
                if kind == ev.DATA:
                    flow_len = event.flow_len
                    stream = streams.get(event.stream_id)
                    if stream is None:  # nobody wants it: the window still reopens
                        self.ack(event.stream_id, flow_len)
                    elif flow_len:
                        stream.listener.on_data(event.data, flow_len)
                elif kind == ev.HEADERS:
                    self._response(event.stream_id, event.status, event.headers or [])
                    if event.end_stream:  # no body
                        self._ended(event.stream_id)
                elif kind == ev.CLOSE:
                    if event.stream_id in streams:  # closed before it ended: reset
                        self._reset(event.stream_id, event.error_code)
                elif kind == ev.END:
                    self._ended(event.stream_id)
                elif kind == ev.GOAWAY:
                    self._goaway(event.last_stream_id, event.error_code)
                elif kind == ev.SETTINGS:
                    self._settings_received()
                elif kind == ev.PING_ACK:
                    self._keepalive_acked()
                elif kind == ev.WINDOW_UPDATE:
                    self._window_opened(event.stream_id)
            except Exception:  # one listener's bug must not take the connection down
                log.exception("handling upstream %s failed", ev.NAMES.get(event.kind))

    def _settings_received(self) -> None:
        # the server's MAX_CONCURRENT_STREAMS is read here, not per request
        self._max_streams = min(self._remote_max_streams(), self.settings.max_concurrent_streams)
        if not self.ready.done():
            self.ready.set_result(None)

    def _response(self, stream_id: int, status: int, headers: Headers) -> None:
        """Response headers (regular fields only) arrived on a stream."""
        stream = self.streams.get(stream_id)
        if stream is None:
            return
        if status < 200:  # informational (100 Continue): the real answer follows
            return
        stream.responded = True
        stream.listener.on_response(status, headers)

    def _goaway(self, last_stream_id: int, error_code: object) -> None:
        self.draining = True
        for stream_id in [sid for sid in self.streams if sid > last_stream_id]:
            stream = self.streams.pop(stream_id)
            stream.listener.on_reset(
                RESET_GOAWAY, f"upstream GOAWAY ({error_code!r}) above last stream"
            )
            stream.listener = NO_LISTENER
        self._maybe_finish()

    def _ended(self, stream_id: int) -> None:
        stream = self.streams.pop(stream_id, None)
        if stream is not None:
            stream.listener.on_end()
            stream.listener = NO_LISTENER
        self._maybe_finish()

    def _reset(self, stream_id: int, error_code: int) -> None:
        stream = self.streams.pop(stream_id, None)
        if stream is not None:
            refused = error_code == REFUSED_STREAM and not stream.responded
            stream.listener.on_reset(
                RESET_REFUSED if refused else RESET_BROKEN,
                f"upstream reset stream (error code {error_code})",
            )
            stream.listener = NO_LISTENER
        self._maybe_finish()

    def _maybe_finish(self) -> None:
        if self.draining and not self.streams:
            self.close()

    def _peer_name(self) -> str:
        return "upstream"

    def close(self) -> None:
        self.draining = True  # no new streams from now on, not only once the transport is gone
        self._flush_now()
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()
