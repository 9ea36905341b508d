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
import random
import ssl
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
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
from kom_gateway.http.h2guard import (
    STALLED_READER,
    WRITE_BACKLOG,
    GuardLimits,
    H2Guard,
    protocol_error_kind,
)
from kom_gateway.http.stream import Flushed, Headers, ServerStream
from kom_gateway.identity import PeerIdentity, identity_of_ssl
from kom_gateway.overload.load import connection_deadline

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class H2ServerSettings:
    max_concurrent_streams: int = 100  # kube-apiserver's default since the rapid-reset fixes
    initial_window: int = 256 * 1024  # per stream, for request bodies
    max_frame_size: int = 16384
    max_header_list_size: int = 1 << 20  # kube-apiserver's 1 MiB
    ping_interval: float = 30.0  # PING a client silent this long (0: never)
    ping_timeout: float = 15.0  # ...and close its connection if it does not answer
    idle_timeout: float = 90.0  # no open stream this long: GOAWAY and close (kube-apiserver's)
    stalled_write_timeout: float = 120.0  # data waits, client opens no window: close
    max_write_backlog: int = 4 << 20  # bytes queued while paused (ACKs, RSTs: no DATA)
    connection_window: int = 0  # 0: streams x stream window
    write_buffer_bytes: int = 256 * 1024  # transport buffer above which producers pause
    max_connection_age: float = 0.0  # GOAWAY a connection this old (0: never)
    max_connection_age_jitter: float = 0.1  # +/- share, so connections do not expire together
    guard: GuardLimits = field(default_factory=GuardLimits)


StreamHandler = Callable[[ServerStream], None]
AbuseListener = Callable[[str], None]  # told the kind when a client is cut off for abuse
GoawayListener = Callable[[str], None]  # told the reason of every GOAWAY sent
GOAWAY_LINGER_SECONDS = 1.0  # golang.org/x/net/http2 goAwayTimeout
GOAWAY_PING = b"kgoaway1"  # PING payload of the two-phase GOAWAY's round trip
GOAWAY_PING_WAIT = 2.0  # send the final GOAWAY after this long even without the PING ACK
MAX_STREAM_ID = 2**31 - 1


class H2ServerStream(ServerStream):
    def __init__(self, conn: H2ServerProtocol, stream_id: int, headers: Headers) -> None:
        super().__init__()
        self._conn = conn
        self.stream_id = stream_id
        self.http_version = "2"
        self.remote_addr = conn.remote_addr
        self.peer = conn.peer
        self.ssl_object = conn.ssl_object
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

    def release_pending(self) -> None:
        """The stream is gone: data still queued will never be sent, but its producer
        must hear that it is done with (upstream, that returns the flow-control credit
        of a shared connection; forgetting would shrink its window for good)."""
        pending, self.pending = self.pending, deque()
        for _, on_flushed in pending:
            if on_flushed is not None:
                on_flushed()

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

    def goaway_connection(self, reason: str) -> None:
        self._conn.goaway(reason)


class H2ServerProtocol(H2TransportMixin, asyncio.Protocol):
    """One downstream HTTP/2 connection."""

    def __init__(
        self,
        handler: StreamHandler,
        settings: H2ServerSettings | None = None,
        on_close: Callable[[H2ServerProtocol], None] | None = None,
        on_abuse: AbuseListener | None = None,
        on_goaway: GoawayListener | None = None,
    ) -> None:
        self.settings = settings or H2ServerSettings()
        self._handler = handler
        self._on_close = on_close
        self._on_abuse = on_abuse
        self._on_goaway = on_goaway
        now = time.monotonic()
        self._expires_at = connection_deadline(
            now,
            self.settings.max_connection_age,
            self.settings.max_connection_age_jitter,
            random.random(),
        )
        self._guard = H2Guard(self.settings.guard, now)
        self._idle_since = now  # when the last stream closed (or the connection opened)
        self._progress_at = now  # last sign the client is taking our data
        self._watchdog: asyncio.TimerHandle | None = None
        self._cut_off = False
        self._paused_backlog = 0  # bytes buffered when the transport paused us
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
        self.peer: PeerIdentity | None = None
        self.ssl_object: ssl.SSLObject | None = None
        self.goaway_sent = False  # no more than one (two-phase) GOAWAY per connection
        self.goaway_final = False  # the GOAWAY with the real last stream id has gone out
        self.goaway_last_stream_id = 0
        self._linger: asyncio.TimerHandle | None = None
        self._goaway_timer: asyncio.TimerHandle | None = None

    # -- asyncio.Protocol ----------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.transport.set_write_buffer_limits(high=self.settings.write_buffer_bytes)
        peer = transport.get_extra_info("peername")
        self.remote_addr = peer[0] if peer else ""
        self.ssl_object = transport.get_extra_info("ssl_object")
        self.peer = identity_of_ssl(self.ssl_object)
        self._start_keepalive(
            self.settings.ping_interval, self.settings.ping_timeout, f"client {self.remote_addr}"
        )
        self._arm_watchdog()
        self.conn.initiate_connection()
        s = self.settings
        open_connection_window(
            self.conn, s.connection_window or s.initial_window * s.max_concurrent_streams
        )
        self._write_out()

    def data_received(self, data: bytes) -> None:
        self._last_read = time.monotonic()
        try:
            events = self.conn.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            # h2 has queued GOAWAY (PROTOCOL_ERROR, or FRAME_SIZE/COMPRESSION) already
            log.info("HTTP/2 protocol error from %s: %s", self.remote_addr, exc)
            self._report(protocol_error_kind(str(exc)))
            self._close_transport()
            return
        for event in events:
            self._dispatch(event)
            if self._cut_off:  # for abuse: the rest of what it sent is not served
                return
        self._write_out()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_keepalive()
        if self._watchdog is not None:
            self._watchdog.cancel()
        for timer in (self._linger, self._goaway_timer):
            if timer is not None:
                timer.cancel()
        streams, self.streams = self.streams, {}
        for stream in streams.values():
            stream._mark_closed()
            stream.release_pending()
        if self._on_close is not None:
            self._on_close(self)

    # -- events ------------------------------------------------------------------------
    def _dispatch(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.DataReceived):
            if (
                not event.data
                and event.stream_ended is None
                and self._over(self._guard.on_empty_data(self._last_read))
            ):
                return
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
            self._progress_at = self._last_read
            if self._over(self._guard.on_control(self._last_read)):
                return
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
            if event.remote_reset:
                self._over(self._guard.on_reset(self._last_read))
        elif isinstance(event, h2.events.PingReceived):
            self._over(self._guard.on_ping(self._last_read))
        elif isinstance(event, h2.events.RemoteSettingsChanged):
            self._over(self._guard.on_settings(self._last_read))
        elif isinstance(event, h2.events.PriorityUpdated):
            self._over(self._guard.on_control(self._last_read))
        elif isinstance(event, h2.events.PingAckReceived):
            if event.ping_data == GOAWAY_PING:
                self._final_goaway()
            else:
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
            if not self._blocked:
                self._progress_at = time.monotonic()  # a wait for the client starts now
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

    def goaway(self, reason: str = "", two_phase: bool = True) -> None:
        """Graceful GOAWAY: accepted streams finish, the client reconnects for new ones.

        Two-phase (RFC 9113 6.8): GOAWAY with the largest stream id and a PING first, so
        requests already on the wire are still served; on the PING's ACK (the client has
        read the first GOAWAY), GOAWAY with the real last stream id. One phase (as Go's
        server does): the last stream id at once, later requests are refused."""
        if self.goaway_sent:
            return
        self.goaway_sent = True
        if self._on_goaway is not None:
            self._on_goaway(reason)
        if not two_phase:
            self._final_goaway()
            return
        self.goaway_last_stream_id = self.conn.send_graceful_goaway(MAX_STREAM_ID)
        with contextlib.suppress(h2.exceptions.ProtocolError):
            self.conn.ping(GOAWAY_PING)
        self._write_out()
        self._goaway_timer = asyncio.get_running_loop().call_later(
            GOAWAY_PING_WAIT, self._final_goaway
        )

    def _final_goaway(self) -> None:
        if self.goaway_final:
            return
        self.goaway_final = True
        if self._goaway_timer is not None:
            self._goaway_timer.cancel()
        self.goaway_last_stream_id = self.conn.send_graceful_goaway()
        self._write_out()
        if not self.streams:
            self._close_after_goaway()

    def _forget(self, stream_id: int) -> None:
        stream = self.streams.pop(stream_id, None)
        self._blocked.discard(stream_id)
        if stream is not None:
            stream._mark_closed()
            stream.release_pending()
            if not self.streams:
                self._idle_since = time.monotonic()
        if self.goaway_final and not self.streams:
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

    # -- limits ------------------------------------------------------------------------
    def _over(self, kind: str | None) -> bool:
        """Cut the client off if it just went over a budget (`kind` is not None)."""
        if kind is None:
            return False
        if self._cut_off:
            return True
        self._cut_off = True
        log.warning("HTTP/2 client %s cut off: %s", self.remote_addr, kind)
        self._report(kind)
        with contextlib.suppress(h2.exceptions.ProtocolError):
            self.conn.close_connection(ErrorCodes.ENHANCE_YOUR_CALM, kind.encode())
        self._close_transport()
        return True

    def _report(self, kind: str) -> None:
        if self._on_abuse is not None:
            self._on_abuse(kind)

    def _arm_watchdog(self) -> None:
        s = self.settings
        timeouts = (s.idle_timeout, s.stalled_write_timeout, s.max_connection_age, 30.0)
        period = min(t for t in timeouts if t > 0) / 4
        self._watchdog = asyncio.get_running_loop().call_later(period, self._check_timeouts)

    def _check_timeouts(self) -> None:
        """Idle connections are closed politely; a client that leaves our data waiting
        (zero window, or not reading TCP) for too long is cut off."""
        self._watchdog = None
        if self.transport is None or self.transport.is_closing():
            return
        now = time.monotonic()
        s = self.settings
        waiting = self._blocked or self._paused
        if waiting and 0 < s.stalled_write_timeout <= now - self._progress_at:
            self._over(STALLED_READER)
            return
        if (
            not waiting
            and not self.streams
            and not self.goaway_sent
            and 0 < s.idle_timeout <= now - self._idle_since
        ):
            log.debug("closing idle HTTP/2 connection from %s", self.remote_addr)
            self.goaway("idle")
        elif self._expires_at is not None and now >= self._expires_at:
            self.goaway("max-age")
        self._arm_watchdog()

    def pause_writing(self) -> None:
        if not self._paused:
            self._progress_at = time.monotonic()
            if self.transport is not None:
                self._paused_backlog = self.transport.get_write_buffer_size()
        super().pause_writing()

    def resume_writing(self) -> None:
        self._progress_at = time.monotonic()
        super().resume_writing()

    def _flush_now(self) -> None:
        super()._flush_now()
        transport = self.transport
        if (
            self._paused
            and transport is not None
            and not transport.is_closing()
            and transport.get_write_buffer_size() - self._paused_backlog
            > self.settings.max_write_backlog
        ):
            self._over(WRITE_BACKLOG)

    def _close_transport(self) -> None:
        self._flush_now()  # a GOAWAY or RST queued just before must still go out
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()
