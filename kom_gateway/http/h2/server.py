"""HTTP/2 server engine `h2`: the pure-Python h2 state machine (the portable fallback).

Writes are flow-controlled per stream: data waits in the stream's queue until the
client's window allows it, and its `on_flushed` callback fires when it is handed to the
transport. A client that stops reading therefore holds back only its own stream, and
what waits is bounded by what the producer was allowed to send (the upstream window).

h2 validates a request's headers for the whole connection (one bad header is a
connection error); here inbound validation is ours (`validate.py`), so a malformed
request costs only its stream, as with nghttp2 and Go.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import deque
from typing import Any

import h2.events
import h2.exceptions
from h2.errors import ErrorCodes

from kom_gateway.http.events import HEADERS, Event
from kom_gateway.http.guard import protocol_error_kind
from kom_gateway.http.h2.conn import (
    STREAM_GONE,
    BlockedStreams,
    engine_events,
    make_connection,
    open_connection_window,
    send_pending,
    split_request,
)
from kom_gateway.http.h2.validate import header_list_size, malformed_request
from kom_gateway.http.serverconn import HTTP2ServerConnection, HTTP2ServerStream
from kom_gateway.http.stream import Flushed, Headers
from kom_gateway.http.transport import PROTOCOL_ERROR

log = logging.getLogger(__name__)


class H2ServerStream(HTTP2ServerStream):
    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.pending: deque[tuple[bytes | memoryview, Flushed | None]] = deque()
        self.end_when_flushed = False

    def release_pending(self) -> None:
        pending, self.pending = self.pending, deque()
        for _, on_flushed in pending:
            if on_flushed is not None:
                on_flushed()


class H2ServerProtocol(BlockedStreams, HTTP2ServerConnection):
    """One downstream HTTP/2 connection on h2."""

    engine = "h2"
    stream_class = H2ServerStream
    streams: dict[int, H2ServerStream]  # type: ignore[assignment]

    def _start(self) -> None:
        s = self.settings
        self.conn = make_connection(
            client_side=False,
            max_concurrent_streams=s.max_concurrent_streams,
            initial_window=s.initial_window,
            max_frame_size=s.max_frame_size,
            max_header_list_size=s.max_header_list_size,
            # what h2 would end the connection for; between the two, 431 on the stream
            decoder_header_list_limit=max(2 * s.max_header_list_size, 1 << 20),
            validate_inbound=False,  # malformed_request() judges each stream instead
        )
        self._blocked: set[int] = set()  # streams with data waiting for window
        self.conn.initiate_connection()
        open_connection_window(
            self.conn, s.connection_window or s.initial_window * s.max_concurrent_streams
        )

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
        self._handle(engine_events(events, self._request_event))
        self._write_out()

    def _request_event(self, event: h2.events.RequestReceived) -> Event | None:
        """A request's HEADERS event, once it passes the checks nghttp2 makes (headers
        over the limit still make one, answered 431); a malformed request is reset here."""
        if header_list_size(event.headers) > self.settings.max_header_list_size:
            return Event(HEADERS, event.stream_id, headers=None)
        problem = malformed_request(event.headers)
        if problem is not None:
            log.info("malformed HTTP/2 request from %s: %s", self.remote_addr, problem)
            self.reset_stream(event.stream_id, PROTOCOL_ERROR)
            return None
        method, path, authority, regular = split_request(event.headers)
        return Event(HEADERS, event.stream_id, end_stream=event.stream_ended is not None,
                     headers=regular, method=method, path=path, authority=authority)  # fmt: skip

    def _client_goaway(self) -> None:
        self._close_transport()  # h2's state machine is closed: nothing more can be sent

    # -- primitives ----------------------------------------------------------------------
    def send_headers(self, stream: HTTP2ServerStream, headers: Headers, end_stream: bool) -> None:
        stream_id = stream.stream_id
        try:
            self.conn.send_headers(stream_id, headers, end_stream=end_stream)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            self._forget(stream_id)
            return
        if end_stream:
            self._forget(stream_id)
        self._write_out()

    def write(self, stream: HTTP2ServerStream, data: bytes, on_flushed: Flushed | None) -> None:
        assert isinstance(stream, H2ServerStream)
        stream.pending.append((data, on_flushed))
        self._flush_stream(stream)

    def end(self, stream: HTTP2ServerStream) -> None:
        assert isinstance(stream, H2ServerStream)
        stream.end_when_flushed = True
        self._flush_stream(stream)

    def _flush_stream(self, stream: H2ServerStream) -> None:
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
        self._track_blocked(sid, pending)
        self._write_out()

    def ack(self, stream_id: int, flow_len: int) -> None:
        if flow_len <= 0:
            return
        try:
            self.conn.acknowledge_received_data(flow_len, stream_id)
        except STREAM_GONE:
            return
        self._write_out()

    def reset_stream(self, stream_id: int, code: int) -> None:
        with contextlib.suppress(*STREAM_GONE):
            self.conn.reset_stream(stream_id, ErrorCodes(code))
        self._forget(stream_id)
        self._write_out()

    def _forget(self, stream_id: int) -> None:
        self._blocked.discard(stream_id)
        super()._forget(stream_id)

    def _send_goaway(self, last_stream_id: int | None, code: int = 0, debug: bytes = b"") -> int:
        if code:
            with contextlib.suppress(h2.exceptions.ProtocolError):
                self.conn.close_connection(ErrorCodes(code), debug or None)
            return self.conn.highest_inbound_stream_id
        return self.conn.send_graceful_goaway(last_stream_id)

    def _send_ping(self, payload: bytes) -> None:
        with contextlib.suppress(h2.exceptions.ProtocolError):
            self.conn.ping(payload)

    def _data_to_send(self) -> bytes:
        return self.conn.data_to_send()

    def _waiting_for_client(self) -> bool:
        return bool(self._blocked)

    def buffered_bytes(self) -> int:
        return sum(len(data) for s in self.streams.values() for data, _ in s.pending)
