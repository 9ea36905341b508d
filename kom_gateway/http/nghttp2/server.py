"""HTTP/2 server engine `nghttp2`: a downstream connection on libnghttp2 (`_nghttp2.pyx`).

nghttp2 validates requests (a malformed one is reset with PROTOCOL_ERROR on its own
stream, the connection lives on), frames responses from each stream's queue, and is fed
and drained in memory: one `receive` per read, one `send` per event-loop pass. The policy
(GOAWAY, keepalive, budgets, timeouts) is the base class's, shared with the h2 engine.
"""

from __future__ import annotations

import logging
import time
from typing import cast

from kom_gateway.http.guard import CONTINUATION_FLOOD, PROTOCOL_ERROR
from kom_gateway.http.nghttp2 import _nghttp2 as ng
from kom_gateway.http.nghttp2.session import after_send, free
from kom_gateway.http.serverconn import (
    MAX_STREAM_ID,
    HTTP2ServerConnection,
    HTTP2ServerStream,
    status_field,
)
from kom_gateway.http.stream import Flushed, Headers
from kom_gateway.http.transport import PROTOCOL_ERROR as PROTOCOL_ERROR_CODE

log = logging.getLogger(__name__)


class NgServerStream(HTTP2ServerStream):
    """start_response and write call the session directly, not through the connection's
    primitives: they run for every response."""

    def start_response(self, status: int, headers: Headers, end_stream: bool = False) -> None:
        if self.closed or self.response_started:
            return
        self.response_started = True
        conn = cast(NgServerProtocol, self._conn)  # (a subclass may not narrow it)
        if not conn.session.respond(self.stream_id, [status_field(status), *headers], end_stream):
            conn._forget(self.stream_id)
        elif conn._flush_handle is None:
            conn._write_out()

    def write(self, data: bytes, on_flushed: Flushed | None = None) -> None:
        conn = cast(NgServerProtocol, self._conn)  # (a subclass may not narrow it)
        if type(data) is not bytes:
            data = bytes(data)
        if not self.closed and conn.session.write(self.stream_id, data, on_flushed):
            if conn._flush_handle is None:
                conn._write_out()
        elif on_flushed is not None:
            on_flushed()  # never sent, but done with: its producer gets its credit back


class NgServerProtocol(HTTP2ServerConnection):
    engine = "nghttp2"
    session: ng.Session
    stream_class = NgServerStream

    def _start(self) -> None:
        s = self.settings
        self.session = session = ng.Session(True, s.max_header_list_size)
        session.submit_settings(
            (
                (ng.SETTINGS_MAX_CONCURRENT_STREAMS, s.max_concurrent_streams),
                (ng.SETTINGS_INITIAL_WINDOW_SIZE, s.initial_window),
                (ng.SETTINGS_MAX_FRAME_SIZE, s.max_frame_size),
                (ng.SETTINGS_MAX_HEADER_LIST_SIZE, s.max_header_list_size),
            )
        )
        session.set_connection_window(
            min(s.connection_window or s.initial_window * s.max_concurrent_streams, 2**31 - 1)
        )

    def data_received(self, data: bytes) -> None:
        self._last_read = time.monotonic()
        session = self.session
        try:
            events = session.receive(data)
        except ng.SessionError as exc:  # fatal: nghttp2 queues no GOAWAY, so we do
            # nghttp2's own flood limits may fire before ours saw the frames: ours first
            for event in session.take_events():
                if self._charge(event):
                    return
            log.info("HTTP/2 protocol error from %s: %s", self.remote_addr, exc)
            kind = CONTINUATION_FLOOD if exc.code == ng.CONTINUATION_FLOOD else PROTOCOL_ERROR
            self._report(kind)
            session.goaway(session.last_proc_stream_id(), PROTOCOL_ERROR_CODE, kind.encode())
            self._close_transport()
            return
        self._handle(events)
        session.run_flushed()
        # what the events answered scheduled its own flush; flush for the read itself
        # only when nghttp2 queued a frame (most requests' reads queue none)
        if not self._session_ended() and session.want_write():
            self._write_out()

    def _session_ended(self) -> bool:
        """nghttp2 wants no more I/O: it ended the connection for a protocol or
        compression error (and its GOAWAY is out), or the client left with GOAWAY and
        nothing is open. Our own graceful GOAWAY closes by its linger instead."""
        if self.session.want_io() or self.goaway_sent or self.transport is None:
            return False
        if not self._client_left and not self._cut_off:  # (a cut-off was counted as such)
            log.info("HTTP/2 protocol error from %s", self.remote_addr)
            self._report(PROTOCOL_ERROR)
        self.goaway_sent = True  # once
        self._close_transport()
        return True

    def _flush_now(self) -> None:
        super()._flush_now()
        self._session_ended()

    def _data_to_send(self) -> bytes:
        # one buffer per pass, unless the transport's is full (nghttp2 then holds the rest)
        return self.session.send() if not self._paused else b""

    def _data_sent(self) -> None:
        # (also when the write just paused the transport: what was framed is out)
        after_send(self.session, self._handle)

    def _closed(self) -> None:
        free(self.session)

    # -- primitives (start_response and write are NgServerStream's) ----------------------
    def end(self, stream: HTTP2ServerStream) -> None:
        if self.session.end(stream.stream_id) and self._flush_handle is None:
            self._write_out()

    def ack(self, stream_id: int, flow_len: int) -> None:
        if flow_len > 0 and self.session.consume(stream_id, flow_len):
            self._write_out()

    def reset_stream(self, stream_id: int, code: int) -> None:
        # frame what the stream already has queued (headers, data) first: nghttp2 would
        # drop it for the RST, and the client must see the response start, then break
        self._flush_now()
        self.session.reset(stream_id, code)
        self._forget(stream_id)
        self._write_out()

    def _send_goaway(self, last_stream_id: int | None, code: int = 0, debug: bytes = b"") -> int:
        if last_stream_id == MAX_STREAM_ID:
            self.session.shutdown_notice()
            return last_stream_id
        if last_stream_id is None:
            last_stream_id = self.session.last_proc_stream_id()
        self.session.goaway(last_stream_id, code, debug)
        return last_stream_id

    def _send_ping(self, payload: bytes) -> None:
        self.session.ping(payload)

    def _waiting_for_client(self) -> bool:
        # data nghttp2 could frame now is not waiting for the client, only not flushed
        # yet (the clock can tick between a write and its flush in the same loop pass)
        session = self.session
        return session.queued_total() > 0 and not session.want_write()

    def buffered_bytes(self) -> int:
        return self.session.queued_total()
