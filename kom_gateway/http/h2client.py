"""Upstream HTTP/2 client connection (gateway -> apiserver), multiplexed.

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
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, cast

import h2.events
import h2.exceptions
from h2.errors import ErrorCodes

from kom_gateway.http.h2conn import (
    STREAM_GONE,
    H2TransportMixin,
    PendingData,
    make_connection,
    open_connection_window,
    send_pending,
)
from kom_gateway.http.stream import Flushed, Headers

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class H2ClientSettings:
    stream_window: int = 256 * 1024
    max_concurrent_streams: int = 100  # ours per connection (kube-apiserver allows 100)
    max_frame_size: int = 256 * 1024
    connect_timeout: float = 5.0
    ping_interval: float = 30.0  # as client-go: PING after 30 s of silence
    ping_timeout: float = 15.0
    connection_window: int = 0  # 0: streams x stream window, so no stream starves others
    write_buffer_bytes: int = 256 * 1024


class StreamListener(Protocol):
    def on_response(self, status: int, headers: Headers) -> None: ...
    def on_data(self, data: bytes, flow_len: int) -> None: ...
    def on_end(self) -> None: ...
    def on_reset(self, kind: str, reason: str) -> None:
        """kind: RESET_GOAWAY / RESET_REFUSED (not processed) or RESET_BROKEN."""


RESET_GOAWAY = "goaway"  # above the server's GOAWAY last-stream-id: not processed
RESET_REFUSED = "refused"  # RST_STREAM(REFUSED_STREAM) before a response: not processed
RESET_BROKEN = "broken"  # anything else: the request may have been processed


class ConnectError(Exception):
    """Could not establish the upstream connection (nothing was sent)."""


class ClientStream:
    """One request on an upstream connection."""

    __slots__ = ("_conn", "end_when_flushed", "listener", "pending", "responded", "stream_id")

    def __init__(self, conn: H2ClientConnection, stream_id: int, listener: StreamListener) -> None:
        self._conn = conn
        self.stream_id = stream_id
        self.listener = listener
        self.pending: PendingData = deque()
        self.end_when_flushed = False
        self.responded = False

    def send_data(self, data: bytes, on_flushed: Flushed | None = None) -> None:
        self.pending.append((data, on_flushed))
        self._conn.flush_stream(self)

    def end(self) -> None:
        self.end_when_flushed = True
        self._conn.flush_stream(self)

    def ack(self, flow_len: int) -> None:
        self._conn._ack(self.stream_id, flow_len)

    def cancel(self) -> None:
        self._conn._cancel(self.stream_id)


class H2ClientConnection(H2TransportMixin, asyncio.Protocol):
    def __init__(
        self,
        settings: H2ClientSettings,
        on_idle: Callable[[H2ClientConnection], None] | None = None,
    ) -> None:
        self.settings = settings
        self.conn = make_connection(
            client_side=True,
            max_concurrent_streams=1000,  # streams the server may push: none (push disabled)
            initial_window=settings.stream_window,
            max_frame_size=settings.max_frame_size,
            validate_inbound=False,  # apiservers are trusted; clients are validated downstream
        )
        self.streams: dict[int, ClientStream] = {}
        self._blocked: set[int] = set()
        self.transport: asyncio.Transport | None = None
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.closed = False
        self.draining = False  # GOAWAY received (or sent): no new streams
        self._paused = False
        self._on_idle = on_idle

    @classmethod
    async def connect(
        cls,
        host: str,
        port: int,
        settings: H2ClientSettings,
        ssl_context: ssl.SSLContext | None = None,
        server_hostname: str | None = None,
    ) -> H2ClientConnection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(settings.connect_timeout):
                _, protocol = await loop.create_connection(
                    lambda: cls(settings),
                    host,
                    port,
                    ssl=ssl_context,
                    server_hostname=server_hostname if ssl_context else None,
                )
                await protocol.ready
        except (OSError, TimeoutError, ssl.SSLError, h2.exceptions.ProtocolError) as exc:
            raise ConnectError(f"{host}:{port}: {exc or type(exc).__name__}") from exc
        if ssl_context is not None:
            assert protocol.transport is not None
            ssl_object = protocol.transport.get_extra_info("ssl_object")
            if ssl_object is None or ssl_object.selected_alpn_protocol() != "h2":
                protocol.close()
                raise ConnectError(f"{host}:{port}: server did not negotiate HTTP/2 (ALPN h2)")
        return protocol

    # -- capacity ----------------------------------------------------------------------
    @property
    def usable(self) -> bool:
        return not self.closed and not self.draining and self.ready.done()

    def has_capacity(self) -> bool:
        return self.usable and len(self.streams) < min(
            self.conn.remote_settings.max_concurrent_streams, self.settings.max_concurrent_streams
        )

    # -- asyncio.Protocol ----------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        s = self.settings
        self.transport.set_write_buffer_limits(high=s.write_buffer_bytes)
        self.conn.initiate_connection()
        open_connection_window(
            self.conn, s.connection_window or s.stream_window * s.max_concurrent_streams
        )
        self._write_out()
        self._start_keepalive(self.settings.ping_interval, self.settings.ping_timeout, "upstream")

    def data_received(self, data: bytes) -> None:
        self._last_read = time.monotonic()
        try:
            events = self.conn.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            log.warning("upstream protocol error: %s", exc)
            self._write_out()
            self.close()
            return
        for event in events:
            try:
                self._dispatch(event)
            except Exception:  # one listener's bug must not take the connection down
                log.exception("handling %s failed", type(event).__name__)
        self._write_out()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(str(exc) if exc else "connection closed"))
            self.ready.exception()  # connect() re-raises it; nobody else needs to
        self._stop_keepalive()
        streams, self.streams = self.streams, {}
        for stream in streams.values():
            stream.listener.on_reset(RESET_BROKEN, "upstream connection lost")

    # -- events --------------------------------------------------------------------------
    def _dispatch(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.DataReceived):
            stream = self.streams.get(event.stream_id)
            if stream is None:
                self._ack(event.stream_id, event.flow_controlled_length)
            else:
                stream.listener.on_data(event.data, event.flow_controlled_length)
            if event.stream_ended is not None:
                self._ended(event.stream_id)
        elif isinstance(event, h2.events.ResponseReceived):
            stream = self.streams.get(event.stream_id)
            if stream is not None:
                stream.responded = True
                status = 0
                headers: Headers = []
                for name, value in event.headers:
                    if name == b":status":
                        status = int(value)
                    else:
                        headers.append((name, value))
                stream.listener.on_response(status, headers)
            if event.stream_ended is not None:
                self._ended(event.stream_id)
        elif isinstance(event, h2.events.StreamEnded):
            self._ended(event.stream_id)
        elif isinstance(event, h2.events.TrailersReceived):
            if event.stream_ended is not None:
                self._ended(event.stream_id)
        elif isinstance(event, h2.events.StreamReset):
            stream = self.streams.pop(event.stream_id, None)
            self._blocked.discard(event.stream_id)
            if stream is not None:
                refused = event.error_code == ErrorCodes.REFUSED_STREAM and not stream.responded
                stream.listener.on_reset(
                    RESET_REFUSED if refused else RESET_BROKEN,
                    f"upstream reset stream ({event.error_code!r})",
                )
            self._maybe_finish()
        elif isinstance(event, h2.events.WindowUpdated):
            targets = list(self._blocked) if event.stream_id == 0 else [event.stream_id]
            for stream_id in targets:
                stream = self.streams.get(stream_id)
                if stream is not None and stream.pending:
                    self.flush_stream(stream)
        elif isinstance(event, h2.events.RemoteSettingsChanged):
            if not self.ready.done():
                self.ready.set_result(None)
        elif isinstance(event, h2.events.PingAckReceived):
            self._ping_acked()
        elif isinstance(event, h2.events.ConnectionTerminated):
            self._goaway(event.last_stream_id or 0, event.error_code)

    def _goaway(self, last_stream_id: int, error_code: object) -> None:
        self.draining = True
        for stream_id in [sid for sid in self.streams if sid > last_stream_id]:
            stream = self.streams.pop(stream_id)
            self._blocked.discard(stream_id)
            stream.listener.on_reset(
                RESET_GOAWAY, f"upstream GOAWAY ({error_code!r}) above last stream"
            )
        self._maybe_finish()

    def _ended(self, stream_id: int) -> None:
        stream = self.streams.pop(stream_id, None)
        self._blocked.discard(stream_id)
        if stream is not None:
            stream.listener.on_end()
        self._maybe_finish()

    def _maybe_finish(self) -> None:
        if self.draining and not self.streams:
            self.close()
        elif not self.streams and self._on_idle is not None:
            self._on_idle(self)

    # -- requests ------------------------------------------------------------------------
    def open_stream(
        self, headers: Headers, end_stream: bool, listener: StreamListener
    ) -> ClientStream:
        """Open a stream (caller checked has_capacity())."""
        stream_id = self.conn.get_next_available_stream_id()
        self.conn.send_headers(stream_id, headers, end_stream=end_stream)
        stream = ClientStream(self, stream_id, listener)
        self.streams[stream_id] = stream
        self._write_out()
        return stream

    def flush_stream(self, stream: ClientStream) -> None:
        if self._paused:
            self._blocked.add(stream.stream_id)
            return
        sid = stream.stream_id
        try:
            if send_pending(self.conn, sid, stream.pending) and stream.end_when_flushed:
                stream.end_when_flushed = False
                self.conn.end_stream(sid)
        except STREAM_GONE:
            stream.pending.clear()
        if stream.pending and sid in self.streams:
            self._blocked.add(sid)
        else:
            self._blocked.discard(sid)
        self._write_out()

    def _ack(self, stream_id: int, flow_len: int) -> None:
        if flow_len <= 0 or self.closed:
            return
        try:
            self.conn.acknowledge_received_data(flow_len, stream_id)
        except STREAM_GONE:
            # the stream is gone: still give the connection window back
            self.conn.increment_flow_control_window(flow_len)
        self._write_out()

    def _cancel(self, stream_id: int) -> None:
        stream = self.streams.pop(stream_id, None)
        self._blocked.discard(stream_id)
        if stream is None:
            return
        with contextlib.suppress(*STREAM_GONE):
            self.conn.reset_stream(stream_id, ErrorCodes.CANCEL)
        self._write_out()
        self._maybe_finish()

    # -- lifecycle -----------------------------------------------------------------------
    def close(self) -> None:
        self._flush_now()
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()
