"""HTTP/2 client engine `nghttp2`: an upstream connection on libnghttp2 (`_nghttp2.pyx`).

Response DATA is credited back (`consume`) only when the exchange acknowledges it, i.e.
once the client side has taken it; bytes for a stream nobody wants any more are credited
at once, so the shared connection window never leaks.
"""

from __future__ import annotations

import logging
import time
from typing import ClassVar

from kom_gateway.http.client import (
    NO_LISTENER,
    ClientStream,
    HTTP2ClientConnection,
    StreamListener,
    StreamRefused,
)
from kom_gateway.http.nghttp2 import _nghttp2 as ng
from kom_gateway.http.nghttp2.session import after_send, free
from kom_gateway.http.stream import Flushed, Headers
from kom_gateway.http.transport import CANCEL

log = logging.getLogger(__name__)


class NgClientConnection(HTTP2ClientConnection):
    engine = "nghttp2"
    session: ng.Session
    setup_errors: ClassVar[tuple[type[BaseException], ...]] = (ng.SessionError,)

    def _start(self) -> None:
        s = self.settings
        self.session = session = ng.Session(False)
        session.submit_settings(
            (
                (ng.SETTINGS_ENABLE_PUSH, 0),
                (ng.SETTINGS_MAX_CONCURRENT_STREAMS, 1000),
                (ng.SETTINGS_INITIAL_WINDOW_SIZE, s.stream_window),
                (ng.SETTINGS_MAX_FRAME_SIZE, s.max_frame_size),
            )
        )
        session.set_connection_window(
            min(s.connection_window or s.stream_window * s.max_concurrent_streams, 2**31 - 1)
        )

    def _remote_max_streams(self) -> int:
        return self.session.remote_max_concurrent_streams()

    def data_received(self, data: bytes) -> None:
        self._last_read = time.monotonic()
        session = self.session
        try:
            events = session.receive(data)
        except ng.SessionError as exc:
            log.warning("upstream protocol error: %s", exc)
            self.close()
            return
        self._handle(events)
        session.run_flushed()
        if session.want_write():  # a frame the read queued (what _handle sent flushes itself)
            self._write_out()

    def _data_to_send(self) -> bytes:
        # one buffer per pass, unless the transport's is full (nghttp2 then holds the rest)
        return self.session.send() if not self._paused else b""

    def _data_sent(self) -> None:
        # (also when the write just paused the transport: what was framed is out)
        after_send(self.session, self._handle)

    def _closed(self) -> None:
        free(self.session)

    # -- requests ------------------------------------------------------------------------
    def open_stream(
        self, headers: Headers, end_stream: bool, listener: StreamListener
    ) -> ClientStream:
        stream_id = self.session.request(headers, end_stream)
        if stream_id <= 0:
            raise StreamRefused(f"nghttp2 could not open a stream (error {stream_id})")
        stream = ClientStream(self, stream_id, listener)
        self.streams[stream_id] = stream
        if self._flush_handle is None:
            self._write_out()
        return stream

    def send_data(self, stream: ClientStream, data: bytes, on_flushed: Flushed | None) -> None:
        if not isinstance(data, bytes):
            data = bytes(data)
        if self.session.write(stream.stream_id, data, on_flushed):
            self._write_out()
        elif on_flushed is not None:
            on_flushed()

    def end_stream(self, stream: ClientStream) -> None:
        if self.session.end(stream.stream_id):
            self._write_out()

    def ack(self, stream_id: int, flow_len: int) -> None:
        if (
            flow_len > 0
            and not self.closed
            and self.session.consume(stream_id, flow_len)
            and self._flush_handle is None
        ):
            self._write_out()

    def cancel(self, stream_id: int) -> None:
        stream = self.streams.pop(stream_id, None)
        if stream is None:
            return
        stream.listener = NO_LISTENER
        self.session.reset(stream_id, CANCEL)
        self._write_out()
        self._maybe_finish()

    def _send_ping(self, payload: bytes) -> None:
        self.session.ping(payload)

    def receive_window(self) -> int:
        return int(self.session.receive_window())

    def local_stream_window(self) -> int:
        return int(self.session.local_setting(ng.SETTINGS_INITIAL_WINDOW_SIZE))

    def unreturned_bytes(self) -> int:
        return int(self.session.data_received - self.session.data_consumed)
