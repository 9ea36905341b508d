"""What every HTTP/2 server engine shares: one downstream connection's life around the
protocol state machine.

An engine (`h2/server.py`: pure-Python h2; `nghttp2/server.py`: libnghttp2) subclasses
`HTTP2ServerConnection` and supplies the frame-level primitives (`_start`, `data_received`,
`send_headers`, `write`, `end`, `ack`, `reset_stream`, `_send_goaway`, `_send_ping`,
`_data_to_send`, `_waiting_for_client`); an engine may instead override a response
action on its stream class (the nghttp2 engine does for the two every response runs).
The policy lives here once: graceful and two-phase GOAWAY with Go's linger, idle and
max-age GOAWAY, PING keepalive, the abuse budgets, the stalled-reader and write-backlog
cut-offs, write coalescing (one transport write per connection per event-loop pass).
"""

from __future__ import annotations

import asyncio
import logging
import random
import ssl
import time
from collections.abc import Callable
from typing import ClassVar, cast

from mypy_extensions import mypyc_attr

from kom_gateway.http import events as ev
from kom_gateway.http.events import EngineEvent
from kom_gateway.http.guard import STALLED_READER, WRITE_BACKLOG, H2Guard
from kom_gateway.http.settings import H2ServerSettings
from kom_gateway.http.stream import Flushed, Headers, ServerStream
from kom_gateway.http.transport import (
    ENHANCE_YOUR_CALM,
    INTERNAL_ERROR,
    NO_ERROR,
    REFUSED_STREAM,
    H2Transport,
)
from kom_gateway.kube.identity import PeerIdentity, identity_of_ssl
from kom_gateway.kube.status import status_body

log = logging.getLogger(__name__)

StreamHandler = Callable[[ServerStream], None]
AbuseListener = Callable[[str], None]  # told the kind when a client is cut off for abuse
GoawayListener = Callable[[str], None]  # told the reason of every GOAWAY sent
GOAWAY_LINGER_SECONDS = 1.0  # golang.org/x/net/http2 goAwayTimeout
GOAWAY_PING = b"kgoaway1"  # PING payload of the two-phase GOAWAY's round trip
GOAWAY_PING_WAIT = 2.0  # send the final GOAWAY after this long even without the PING ACK
MAX_STREAM_ID = 2**31 - 1


def connection_deadline(opened_at: float, max_age: float, jitter: float, u: float) -> float | None:
    """When a connection opened at `opened_at` gets its GOAWAY (None: never); `jitter`
    is the +/- share of `max_age`, `u` uniform in [0, 1)."""
    if max_age <= 0:
        return None
    return opened_at + max_age * (1.0 + jitter * (2.0 * u - 1.0))


_STATUS_FIELDS: dict[int, tuple[bytes, bytes]] = {}


def status_field(status: int) -> tuple[bytes, bytes]:
    """The `:status` pseudo-header field, encoded once per status code."""
    field = _STATUS_FIELDS.get(status)
    if field is None:
        field = _STATUS_FIELDS[status] = (b":status", b"%d" % status)
    return field


@mypyc_attr(allow_interpreted_subclasses=True)  # the h2 / HTTP/1.1 engines extend it
class HTTP2ServerStream(ServerStream):
    """One request on a downstream HTTP/2 connection; every action goes to the engine."""

    http_version = "2"

    def __init__(
        self,
        conn: HTTP2ServerConnection,
        stream_id: int,
        method: str,
        target: str,
        authority: str,
        headers: Headers,
    ) -> None:
        super().__init__()
        self._conn = conn
        self.stream_id = stream_id
        self.remote_addr = conn.remote_addr
        self.peer = conn.peer
        self.ssl_object = conn.ssl_object
        self.method = method
        self.target = target
        self.authority = authority
        self.headers = headers  # regular fields only

    @property
    def connection(self) -> HTTP2ServerConnection:
        return self._conn

    def ack_body(self, flow_len: int) -> None:
        self._conn.ack(self.stream_id, flow_len)

    def start_response(self, status: int, headers: Headers, end_stream: bool = False) -> None:
        if self.closed or self.response_started:
            return
        self.response_started = True
        self._conn.send_headers(self, [status_field(status), *headers], end_stream)

    def write(self, data: bytes, on_flushed: Flushed | None = None) -> None:
        if self.closed:
            if on_flushed is not None:
                on_flushed()  # never sent, but done with: its producer gets its credit back
            return
        self._conn.write(self, data, on_flushed)

    def end(self) -> None:
        if self.closed:
            return
        if not self.response_started:
            self.start_response(200, [], end_stream=True)
            return
        self._conn.end(self)

    def reset(self) -> None:
        if not self.closed:
            self._conn.reset_stream(self.stream_id, INTERNAL_ERROR)

    def goaway_connection(self, reason: str) -> None:
        self._conn.goaway(reason)

    def release_pending(self) -> None:
        """The stream is gone: data its engine still holds will never be sent, but its
        producers must hear they are done with it (upstream, that returns the credit of
        a shared connection window). Engines that hold data override this."""


@mypyc_attr(allow_interpreted_subclasses=True)  # the h2 / HTTP/1.1 engines extend it
class HTTP2ServerConnection(H2Transport):
    """One downstream HTTP/2 connection: the policy; the engine subclass the frames."""

    # ClassVars: each engine's subclass sets them (compiled, a plain annotation would be
    # a per-instance slot that a subclass's class attribute cannot override)
    engine: ClassVar[str] = ""
    stream_class: ClassVar[type[HTTP2ServerStream]] = HTTP2ServerStream
    streams: dict[int, HTTP2ServerStream]

    def __init__(
        self,
        handler: StreamHandler,
        settings: H2ServerSettings | None = None,
        on_close: Callable[[HTTP2ServerConnection], None] | None = None,
        on_abuse: AbuseListener | None = None,
        on_goaway: GoawayListener | None = None,
    ) -> None:
        super().__init__()
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
        self._last_read = now
        self._cut_off = False
        self._client_left = False  # the client sent GOAWAY
        self._paused = False
        self._paused_backlog = 0  # bytes buffered when the transport paused us
        self.streams = {}
        self.remote_addr = ""
        self.peer: PeerIdentity | None = None
        self.ssl_object: ssl.SSLObject | None = None
        self.goaway_sent = False  # no more than one (two-phase) GOAWAY per connection
        self.goaway_final = False  # the GOAWAY with the real last stream id has gone out
        self.goaway_last_stream_id = 0
        self._linger: asyncio.TimerHandle | None = None
        self._goaway_timer: asyncio.TimerHandle | None = None

    # -- engine primitives ---------------------------------------------------------------
    def _start(self) -> None:
        """Queue the server preface and our SETTINGS; open the connection window."""
        raise NotImplementedError

    def send_headers(self, stream: HTTP2ServerStream, headers: Headers, end_stream: bool) -> None:
        raise NotImplementedError

    def write(self, stream: HTTP2ServerStream, data: bytes, on_flushed: Flushed | None) -> None:
        raise NotImplementedError

    def end(self, stream: HTTP2ServerStream) -> None:
        raise NotImplementedError

    def ack(self, stream_id: int, flow_len: int) -> None:
        raise NotImplementedError

    def reset_stream(self, stream_id: int, code: int) -> None:
        raise NotImplementedError

    def _send_goaway(
        self, last_stream_id: int | None, code: int = NO_ERROR, debug: bytes = b""
    ) -> int:
        """Queue a GOAWAY (None: the highest stream id processed); the id announced."""
        raise NotImplementedError

    def _waiting_for_client(self) -> bool:
        """Some stream has data that waits for the client's flow-control window."""
        raise NotImplementedError

    def _client_goaway(self) -> None:
        """The client sent GOAWAY: its open streams still finish (an engine whose state
        machine cannot finish them closes instead)."""
        self._client_left = True

    def buffered_bytes(self) -> int:
        """Response bytes held for this client, waiting for its window."""
        raise NotImplementedError

    # -- asyncio.Protocol ----------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self._loop = asyncio.get_running_loop()
        self.transport.set_write_buffer_limits(high=self.settings.write_buffer_bytes)
        peer = transport.get_extra_info("peername")
        self.remote_addr = peer[0] if peer else ""
        self.ssl_object = transport.get_extra_info("ssl_object")
        self.peer = identity_of_ssl(self.ssl_object)
        s = self.settings
        timeouts = (s.idle_timeout, s.stalled_write_timeout, s.max_connection_age, 30.0)
        self._start_clock(s.ping_interval, s.ping_timeout, min(t for t in timeouts if t > 0) / 4)
        self._start()
        self._write_out()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_transport_timers()
        for timer in (self._linger, self._goaway_timer):
            if timer is not None:
                timer.cancel()
        streams, self.streams = self.streams, {}
        for stream in streams.values():
            stream._mark_closed()
            stream.release_pending()
        self._closed()
        if self._on_close is not None:
            self._on_close(self)

    def _closed(self) -> None:
        """The transport is gone: free what the engine holds."""

    def pause_writing(self) -> None:
        if not self._paused:
            self._progress_at = time.monotonic()
            if self.transport is not None:
                self._paused_backlog = self.transport.get_write_buffer_size()
        self._paused = True

    def resume_writing(self) -> None:
        self._progress_at = time.monotonic()
        self._paused = False
        self._resumed()

    def _resumed(self) -> None:
        """The transport drained: engines holding data back while paused send it now."""
        self._write_out()

    # -- what the client did ---------------------------------------------------------------
    def _handle(self, events: list[EngineEvent]) -> None:
        """Act on what the client sent, in order (either engine's events). Once the
        client is cut off for abuse, the rest is not served; one event's failure is
        logged and the rest go on (a stream's close must not be lost to another stream's
        bug)."""
        for event in events:
            if self._cut_off:
                return
            try:
                self._on_event(event)
            except Exception:
                log.exception(
                    "handling HTTP/2 %s from %s failed", ev.NAMES.get(event.kind), self.remote_addr
                )

    def _on_event(self, event: EngineEvent) -> None:
        kind = event.kind
        if kind == ev.DATA:
            flow_len = event.flow_len
            if flow_len == 0:  # an empty frame: nothing to deliver, a budget to charge
                self._charge(event)
                return
            stream = self.streams.get(event.stream_id)
            if stream is None:  # gone: its bytes still reopen the connection's window
                self.ack(event.stream_id, flow_len)
            else:
                stream._deliver_body(event.data, flow_len)
        elif kind == ev.HEADERS:
            headers = event.headers
            if headers is None:
                self._headers_too_large(event.stream_id)
            else:
                self._new_stream(
                    event.stream_id,
                    event.method,
                    event.path,
                    event.authority,
                    headers,
                    event.end_stream,
                )
        elif kind == ev.CLOSE:
            self._forget(event.stream_id)
        elif kind == ev.END:
            stream = self.streams.get(event.stream_id)
            if stream is not None and not stream.body_done:
                stream._deliver_body_end()
        elif kind == ev.WINDOW_UPDATE:
            self._progress_at = self._last_read
            if not self._charge(event):
                self._window_opened(event.stream_id)
        elif kind == ev.PING_ACK:
            self._ping_ack_received(event.data)
        elif kind == ev.GOAWAY:
            self._client_goaway()
        else:  # RESET, PING, SETTINGS, PRIORITY: the engine has acted; only budgets left
            self._charge(event)

    def _charge(self, event: EngineEvent) -> bool:
        """The one place a client's frames are charged to its abuse budgets (both
        engines; the nghttp2 engine also for frames it read before it ended the
        connection itself). True if this frame cut the client off."""
        kind = event.kind
        g = self._guard
        now = self._last_read
        if kind == ev.RESET:
            return self._over(g.on_reset(now))
        if kind == ev.PING:
            return self._over(g.on_ping(now))
        if kind == ev.SETTINGS:
            return self._over(g.on_settings(now))
        if kind == ev.WINDOW_UPDATE or kind == ev.PRIORITY:
            return self._over(g.on_control(now))
        if kind == ev.DATA and event.flow_len == 0:
            return self._over(g.on_empty_data(now))
        return False

    # -- streams -------------------------------------------------------------------------
    def _new_stream(
        self,
        stream_id: int,
        method: str,
        target: str,
        authority: str,
        headers: Headers,
        end_stream: bool,
    ) -> None:
        """A request arrived: hand it to the handler (after our GOAWAY: refuse it)."""
        if self.goaway_sent and stream_id > self.goaway_last_stream_id:
            # not processed: the client retries it elsewhere
            self.reset_stream(stream_id, REFUSED_STREAM)
            return
        stream = self.stream_class(self, stream_id, method, target, authority, headers)
        self.streams[stream_id] = stream
        if end_stream:  # no body (nobody to tell yet: the handler reads body_done)
            stream._body_done = True
        try:
            self._handler(stream)
        except Exception:  # a handler bug must not take the connection down
            log.exception("stream handler failed")
            self.reset_stream(stream_id, INTERNAL_ERROR)

    def _headers_too_large(self, stream_id: int) -> None:
        """A request over SETTINGS_MAX_HEADER_LIST_SIZE: 431 with a Status on its stream,
        as kube-apiserver answers; the connection and its other streams carry on."""
        log.info("HTTP/2 request headers from %s over the limit", self.remote_addr)
        stream = self.stream_class(self, stream_id, "", "", "", [])
        self.streams[stream_id] = stream
        body = status_body(431, "RequestHeaderFieldsTooLarge", "request headers too large")
        stream.start_response(
            431, [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
        )
        stream.write(body)
        stream.end()

    def _forget(self, stream_id: int) -> None:
        stream = self.streams.pop(stream_id, None)
        if stream is not None:
            stream._mark_closed()
            stream.release_pending()
            if not self.streams:
                self._idle_since = time.monotonic()
        if self.goaway_final and not self.streams:
            self._close_after_goaway()

    # -- GOAWAY --------------------------------------------------------------------------
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
        self.goaway_last_stream_id = self._send_goaway(MAX_STREAM_ID)
        self._send_ping(GOAWAY_PING)
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
        self.goaway_last_stream_id = self._send_goaway(None)
        self._write_out()
        if not self.streams:
            self._close_after_goaway()

    def _close_after_goaway(self) -> None:
        """Linger before closing, as Go's server does: requests the client sent before
        it saw our GOAWAY then get REFUSED_STREAM (safe to retry), not a dead socket."""
        if self._linger is None and self.transport is not None:
            self._linger = asyncio.get_running_loop().call_later(
                GOAWAY_LINGER_SECONDS, self._linger_over
            )

    def _linger_over(self) -> None:
        """Close, unless a stream was accepted during the linger: a request read in the
        same batch as the PING ACK that sent the final GOAWAY is under its last stream
        id (a watch, say); it keeps the connection until it ends, then lingers again."""
        self._linger = None
        if not self.streams:
            self._close_transport()

    def _ping_ack_received(self, payload: bytes) -> None:
        if payload == GOAWAY_PING:
            self._final_goaway()
        else:
            self._keepalive_acked()

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
        self._send_goaway(None, ENHANCE_YOUR_CALM, kind.encode())
        self._close_transport()
        return True

    def _report(self, kind: str) -> None:
        if self._on_abuse is not None:
            self._on_abuse(kind)

    def _on_tick(self, now: float) -> None:
        """Keepalive (H2Transport), then: idle connections are closed politely; a
        client that leaves our data waiting (zero window, or not reading TCP) for too
        long is cut off."""
        if not self._keepalive_tick(now):
            return
        s = self.settings
        waiting = self._paused or self._waiting_for_client()
        if not waiting:
            self._progress_at = now  # a wait, if one starts, is measured from here
        elif 0 < s.stalled_write_timeout <= now - self._progress_at:
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

    def _peer_name(self) -> str:
        return f"client {self.remote_addr}"

    def _flush_now(self) -> None:
        super()._flush_now()
        transport = self.transport
        if (
            transport is not None
            and not transport.is_closing()
            and self._paused
            and transport.get_write_buffer_size() - self._paused_backlog
            > self.settings.max_write_backlog
        ):
            self._over(WRITE_BACKLOG)

    def _close_transport(self) -> None:
        self._flush_now()  # a GOAWAY or RST queued just before must still go out
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()
