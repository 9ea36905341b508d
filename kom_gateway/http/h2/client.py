"""HTTP/2 client engine `h2`: upstream connections on the pure-Python h2 state machine."""

from __future__ import annotations

import contextlib
import logging
import time
from collections import deque

import h2.exceptions
from h2.errors import ErrorCodes

from kom_gateway import compat
from kom_gateway.http.client import (
    NO_LISTENER,
    ClientStream,
    HTTP2ClientConnection,
    StreamListener,
    StreamRefused,
)
from kom_gateway.http.h2.conn import (
    STREAM_GONE,
    BlockedStreams,
    PendingData,
    engine_events,
    make_connection,
    open_connection_window,
    send_pending,
)
from kom_gateway.http.stream import Flushed, Headers
from kom_gateway.http.transport import CANCEL

log = logging.getLogger(__name__)


class H2ClientConnection(BlockedStreams, HTTP2ClientConnection):
    engine = "h2"
    setup_errors = (h2.exceptions.ProtocolError,)

    def _start(self) -> None:
        s = self.settings
        self.conn = make_connection(
            client_side=True,
            max_concurrent_streams=1000,  # streams the server may push: none (push disabled)
            initial_window=s.stream_window,
            max_frame_size=s.max_frame_size,
            validate_inbound=False,  # apiservers are trusted; clients are validated downstream
        )
        self._blocked: set[int] = set()
        self.conn.initiate_connection()
        open_connection_window(
            self.conn, s.connection_window or s.stream_window * s.max_concurrent_streams
        )

    def _remote_max_streams(self) -> int:
        return int(self.conn.remote_settings.max_concurrent_streams)

    def data_received(self, data: bytes) -> None:
        self._last_read = time.monotonic()
        try:
            events = self.conn.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            log.warning("upstream protocol error: %s", exc)
            self._write_out()
            self.close()
            return
        self._handle(engine_events(events))
        self._write_out()

    def _reset(self, stream_id: int, error_code: int) -> None:
        self._blocked.discard(stream_id)
        super()._reset(stream_id, error_code)

    def _ended(self, stream_id: int) -> None:
        self._blocked.discard(stream_id)
        super()._ended(stream_id)

    # -- requests ------------------------------------------------------------------------
    def open_stream(
        self, headers: Headers, end_stream: bool, listener: StreamListener
    ) -> ClientStream:
        try:
            stream_id = self.conn.get_next_available_stream_id()
            self.conn.send_headers(stream_id, headers, end_stream=end_stream)
        except (h2.exceptions.ProtocolError, h2.exceptions.StreamClosedError) as exc:
            raise StreamRefused(str(exc)) from exc
        stream = ClientStream(self, stream_id, listener)
        stream.pending = deque()
        self.streams[stream_id] = stream
        self._write_out()
        return stream

    def send_data(self, stream: ClientStream, data: bytes, on_flushed: Flushed | None) -> None:
        self._pending(stream).append((data, on_flushed))
        self._flush_stream(stream)

    def end_stream(self, stream: ClientStream) -> None:
        stream.end_when_flushed = True
        self._flush_stream(stream)

    @staticmethod
    def _pending(stream: ClientStream) -> PendingData:
        assert isinstance(stream.pending, deque)
        return stream.pending

    def _flush_stream(self, stream: ClientStream) -> None:
        sid = stream.stream_id
        if self._paused:
            self._blocked.add(sid)
            return
        pending = self._pending(stream)
        try:
            if send_pending(self.conn, sid, pending) and stream.end_when_flushed:
                stream.end_when_flushed = False
                self.conn.end_stream(sid)
        except STREAM_GONE:
            pending.clear()
        self._track_blocked(sid, pending)
        self._write_out()

    def ack(self, stream_id: int, flow_len: int) -> None:
        if flow_len <= 0 or self.closed:
            return
        try:
            self.conn.acknowledge_received_data(flow_len, stream_id)
        except STREAM_GONE:
            # the stream is gone: still give the connection window back
            self.conn.increment_flow_control_window(flow_len)
        self._write_out()

    def cancel(self, stream_id: int) -> None:
        stream = self.streams.pop(stream_id, None)
        self._blocked.discard(stream_id)
        if stream is None:
            return
        stream.listener = NO_LISTENER
        with contextlib.suppress(*STREAM_GONE):
            self.conn.reset_stream(stream_id, ErrorCodes(CANCEL))
        self._write_out()
        self._maybe_finish()

    def _send_ping(self, payload: bytes) -> None:
        with contextlib.suppress(h2.exceptions.ProtocolError):
            self.conn.ping(payload)

    def _data_to_send(self) -> bytes:
        return self.conn.data_to_send()

    def receive_window(self) -> int:
        return int(self.conn.inbound_flow_control_window)

    def local_stream_window(self) -> int:
        return int(self.conn.local_settings.initial_window_size)

    def unreturned_bytes(self) -> int:
        return compat.h2_unreturned_bytes(self.conn)
