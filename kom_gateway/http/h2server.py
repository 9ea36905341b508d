"""HTTP/2 server connection: h2 state machine + an asyncio transport.

Writes are flow-controlled per stream: data waits in the stream's queue until the
client's window allows it, and its `on_flushed` callback fires when it is handed to the
transport. A client that stops reading therefore holds back only its own stream, and
what waits is bounded by what the producer was allowed to send (the upstream window).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

import h2.events
import h2.exceptions
from h2.errors import ErrorCodes

from kom_gateway.http.h2conn import (
    STREAM_GONE,
    H2TransportMixin,
    make_connection,
    open_connection_window,
    send_pending,
)
from kom_gateway.http.stream import Flushed, Headers, ServerStream

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class H2ServerSettings:
    max_concurrent_streams: int = 250
    initial_window: int = 256 * 1024  # per stream, for request bodies
    max_frame_size: int = 16384
    max_header_list_size: int = 1 << 20  # kube-apiserver's 1 MiB
    ping_interval: float = 30.0  # PING a client silent this long (0: never)
    ping_timeout: float = 15.0  # ...and close its connection if it does not answer


StreamHandler = Callable[[ServerStream], None]
GOAWAY_LINGER_SECONDS = 1.0  # golang.org/x/net/http2 goAwayTimeout


class H2ServerStream(ServerStream):
    def __init__(self, conn: H2ServerProtocol, stream_id: int, headers: Headers) -> None:
        super().__init__()
        self._conn = conn
        self.stream_id = stream_id
        self.http_version = "2"
        self.remote_addr = conn.remote_addr
        self.peer_cert = conn.peer_cert
        self.method = ""
        self.target = ""
        self.authority = ""
        regular: Headers = []
        for name, value in headers:
            if name[:1] == b":":
                if name == b":method":
                    self.method = value.decode("latin-1")
                elif name == b":path":
                    self.target = value.decode("latin-1")
                elif name == b":authority":
                    self.authority = value.decode("latin-1")
            else:
                regular.append((name, value))
        self.headers = regular
        self.pending: deque[tuple[bytes | memoryview, Flushed | None]] = deque()
        self.end_when_flushed = False

    @property
    def connection(self) -> H2ServerProtocol:
        return self._conn

    def ack_body(self, flow_len: int) -> None:
        self._conn.ack(self.stream_id, flow_len)

    def start_response(self, status: int, headers: Headers, end_stream: bool = False) -> None:
        if self.closed or self.response_started:
            return
        self.response_started = True
        self._conn.send_headers(
            self.stream_id, [(b":status", str(status).encode()), *headers], end_stream
        )
        if end_stream:
            self._mark_closed()

    def write(self, data: bytes, on_flushed: Flushed | None = None) -> None:
        if self.closed:
            return
        self.pending.append((data, on_flushed))
        self._conn.flush_stream(self)

    def end(self) -> None:
        if self.closed:
            return
        if not self.response_started:
            self.start_response(200, [], end_stream=True)
            return
        self.end_when_flushed = True
        self._conn.flush_stream(self)

    def reset(self) -> None:
        if self.closed:
            return
        self._conn.reset_stream(self.stream_id, ErrorCodes.INTERNAL_ERROR)


class H2ServerProtocol(H2TransportMixin, asyncio.Protocol):
    """One downstream HTTP/2 connection."""

    def __init__(
        self,
        handler: StreamHandler,
        settings: H2ServerSettings | None = None,
        on_close: Callable[[H2ServerProtocol], None] | None = None,
    ) -> None:
        self.settings = settings or H2ServerSettings()
        self._handler = handler
        self._on_close = on_close
        self.conn = make_connection(
            client_side=False,
            max_concurrent_streams=self.settings.max_concurrent_streams,
            initial_window=self.settings.initial_window,
            max_frame_size=self.settings.max_frame_size,
            max_header_list_size=self.settings.max_header_list_size,
        )
        self.streams: dict[int, H2ServerStream] = {}
        self._blocked: set[int] = set()  # streams with data waiting for window
        self.transport: asyncio.Transport | None = None
        self._paused = False
        self.remote_addr = ""
        self.peer_cert: dict | None = None
        self.goaway_sent = False
        self.goaway_last_stream_id = 0
        self._linger: asyncio.TimerHandle | None = None

    # -- asyncio.Protocol ----------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        peer = transport.get_extra_info("peername")
        self.remote_addr = peer[0] if peer else ""
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is not None:
            self.peer_cert = ssl_object.getpeercert() or None
        self._start_keepalive(
            self.settings.ping_interval, self.settings.ping_timeout, f"client {self.remote_addr}"
        )
        self.conn.initiate_connection()
        open_connection_window(
            self.conn, self.settings.initial_window * self.settings.max_concurrent_streams
        )
        self._write_out()

    def data_received(self, data: bytes) -> None:
        self._last_read = time.monotonic()
        try:
            events = self.conn.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            log.debug("h2 protocol error from %s: %s", self.remote_addr, exc)
            self._write_out()
            self._close_transport()
            return
        for event in events:
            self._dispatch(event)
        self._write_out()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_keepalive()
        if self._linger is not None:
            self._linger.cancel()
        streams, self.streams = self.streams, {}
        for stream in streams.values():
            stream._mark_closed()
        if self._on_close is not None:
            self._on_close(self)

    # -- events ------------------------------------------------------------------------
    def _dispatch(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.DataReceived):
            stream = self.streams.get(event.stream_id)
            if stream is None:
                self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                return
            stream._deliver_body(event.data, event.flow_controlled_length)
            if event.stream_ended is not None:
                stream._deliver_body_end()
        elif isinstance(event, h2.events.RequestReceived):
            if self.goaway_sent and event.stream_id > self.goaway_last_stream_id:
                # after our GOAWAY: not processed, the client retries it elsewhere
                self.reset_stream(event.stream_id, ErrorCodes.REFUSED_STREAM)
                return
            stream = H2ServerStream(self, event.stream_id, event.headers)
            self.streams[event.stream_id] = stream
            if event.stream_ended is not None:
                stream._deliver_body_end()
            try:
                self._handler(stream)
            except Exception:  # a handler bug must not take the connection down
                log.exception("stream handler failed")
                self.reset_stream(event.stream_id, ErrorCodes.INTERNAL_ERROR)
        elif isinstance(event, h2.events.StreamEnded):
            stream = self.streams.get(event.stream_id)
            if stream is not None and not stream.body_done:
                stream._deliver_body_end()
        elif isinstance(event, h2.events.WindowUpdated):
            if event.stream_id == 0:
                for stream_id in list(self._blocked):
                    stream = self.streams.get(stream_id)
                    if stream is not None:
                        self.flush_stream(stream)
            else:
                stream = self.streams.get(event.stream_id)
                if stream is not None and stream.pending:
                    self.flush_stream(stream)
        elif isinstance(event, h2.events.StreamReset):
            self._forget(event.stream_id)
        elif isinstance(event, h2.events.PingAckReceived):
            self._ping_acked()
        elif isinstance(event, h2.events.ConnectionTerminated):
            self._close_transport()

    # -- sending -----------------------------------------------------------------------
    def send_headers(self, stream_id: int, headers: Headers, end_stream: bool) -> None:
        try:
            self.conn.send_headers(stream_id, headers, end_stream=end_stream)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            self._forget(stream_id)
            return
        if end_stream:
            self._forget(stream_id)
        self._write_out()

    def flush_stream(self, stream: H2ServerStream) -> None:
        """Send what the window allows; call flushed callbacks; end when drained."""
        if self._paused or self.transport is None:
            self._blocked.add(stream.stream_id)
            return
        sid = stream.stream_id
        pending = stream.pending
        try:
            if send_pending(self.conn, sid, pending) and stream.end_when_flushed:
                self.conn.end_stream(sid)
                self._forget(sid)
        except STREAM_GONE:
            self._forget(sid)
        if pending and sid in self.streams:
            self._blocked.add(sid)
        else:
            self._blocked.discard(sid)
        self._write_out()

    def ack(self, stream_id: int, flow_len: int) -> None:
        if flow_len <= 0:
            return
        try:
            self.conn.acknowledge_received_data(flow_len, stream_id)
        except STREAM_GONE:
            return
        self._write_out()

    def reset_stream(self, stream_id: int, code: ErrorCodes) -> None:
        with contextlib.suppress(*STREAM_GONE):
            self.conn.reset_stream(stream_id, code)
        self._forget(stream_id)
        self._write_out()

    def goaway(self, last_stream_id: int | None = None) -> None:
        """Graceful GOAWAY: accepted streams finish, the client reconnects for new ones."""
        if self.goaway_sent:
            return
        self.goaway_sent = True
        self.goaway_last_stream_id = self.conn.send_graceful_goaway(last_stream_id)
        self._write_out()
        if not self.streams:
            self._close_after_goaway()

    def _forget(self, stream_id: int) -> None:
        stream = self.streams.pop(stream_id, None)
        self._blocked.discard(stream_id)
        if stream is not None:
            stream._mark_closed()
        if self.goaway_sent and not self.streams:
            self._close_after_goaway()

    def _close_after_goaway(self) -> None:
        """Linger before closing, as Go's server does: requests the client sent before
        it saw our GOAWAY then get REFUSED_STREAM (safe to retry), not a dead socket."""
        if self._linger is None and self.transport is not None:
            self._linger = asyncio.get_running_loop().call_later(
                GOAWAY_LINGER_SECONDS, self._close_transport
            )

    def close(self) -> None:
        self._close_transport()

    def _close_transport(self) -> None:
        self._flush_now()  # a GOAWAY or RST queued just before must still go out
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()
