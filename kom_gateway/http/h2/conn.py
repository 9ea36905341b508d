"""h2 connection objects with a graceful GOAWAY and the settings both sides share, and
h2's events translated into the engines' vocabulary (`events.py`)."""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
from h2.errors import ErrorCodes
from hyperframe.frame import GoAwayFrame

from kom_gateway import compat
from kom_gateway.http import events as ev
from kom_gateway.http.events import Event
from kom_gateway.http.h2.hpack_encoder import MEMO_MAX_BYTES, StatelessEncoder
from kom_gateway.http.settings import ConnectionLimits
from kom_gateway.http.stream import Headers

# the h2 engine's two hpack cost fixes (measured reasons in compat.py)
compat.memoize_huffman_decoding(MEMO_MAX_BYTES)
compat.silence_hpack_debug_logging()

log = logging.getLogger(__name__)

# What h2 raises when a stream is already gone (reset, ended, never existed).
STREAM_GONE = (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError, KeyError)


class GracefulH2Connection(compat.H2ConnectionHooks):
    """An H2Connection that keeps working after GOAWAY, received or sent.

    Stock h2 moves the connection to CLOSED and drops queued output on GOAWAY, so the
    streams the peer promised to finish (ids <= last_stream_id: watches, long LISTs)
    could no longer be read. The peer is still sending them; so do we. The caller stops
    opening streams and retries those above last_stream_id elsewhere.
    """

    def send_graceful_goaway(self, last_stream_id: int | None = None) -> int:
        """Send GOAWAY(NO_ERROR) but keep serving streams up to `last_stream_id`.

        Stock `close_connection` also moves the state machine to CLOSED, after which
        not even the announced streams could be finished. Returns the last stream id.
        """
        if last_stream_id is None:
            last_stream_id = self.highest_inbound_stream_id
        frame = GoAwayFrame(stream_id=0, last_stream_id=last_stream_id, error_code=0)
        self.queue_frame(frame.serialize())
        return last_stream_id

    def on_goaway_frame(self, frame: Any) -> list[Any]:
        event = h2.events.ConnectionTerminated()
        try:
            event.error_code = ErrorCodes(frame.error_code)
        except ValueError:
            event.error_code = frame.error_code
        event.last_stream_id = frame.last_stream_id
        event.additional_data = frame.additional_data or None
        return [event]


def make_connection(
    *,
    client_side: bool,
    max_concurrent_streams: int,
    initial_window: int,
    max_frame_size: int = 16384,
    max_header_list_size: int = ConnectionLimits.max_header_bytes,
    decoder_header_list_limit: int | None = None,
    validate_inbound: bool = True,
) -> GracefulH2Connection:
    """Inbound headers are validated where they come from clients (`validate_inbound`);
    outbound ones are not re-validated: they are either ours or already validated on the
    way in, and h2's per-header checks are a large share of a proxied request's cost."""
    config = h2.config.H2Configuration(
        client_side=client_side,
        header_encoding=None,  # bytes in, bytes out: no per-header decode on the hot path
        validate_inbound_headers=validate_inbound,
        normalize_inbound_headers=validate_inbound,
        validate_outbound_headers=False,
        normalize_outbound_headers=False,
    )
    conn = GracefulH2Connection(config=config)
    conn.encoder = StatelessEncoder()  # type: ignore[assignment]
    conn.local_settings = h2.settings.Settings(
        client=client_side,
        initial_values={
            h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: max_concurrent_streams,
            h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: initial_window,
            h2.settings.SettingCodes.MAX_FRAME_SIZE: max_frame_size,
            h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: max_header_list_size,
            h2.settings.SettingCodes.ENABLE_PUSH: 0,
        },
    )
    # h2 derives these from local settings only in __init__ and when an ACK *changes* a
    # value; installed as initial values they never change, so apply them here, or the
    # peer honours limits we advertise and our own parser rejects its frames / headers.
    conn.max_inbound_frame_size = max_frame_size
    conn.decoder.max_header_list_size = decoder_header_list_limit or max_header_list_size
    return conn


def open_connection_window(conn: h2.connection.H2Connection, target: int) -> None:
    """Raise the connection-level receive window to `target` (it starts at 65535).

    A connection window of streams x stream-window means no single stream that stops
    being read can starve the others (kube-apiserver sizes its own the same way).
    """
    current = conn.inbound_flow_control_window
    if target > current:
        conn.increment_flow_control_window(target - current)


RequestTranslator = Callable[[h2.events.RequestReceived], "Event | None"]


def engine_events(
    events: list[h2.events.Event], request: RequestTranslator | None = None
) -> list[Event]:
    """h2's events as the engines' events. `request` turns a request's headers into
    its HEADERS event, or None when the engine refused it (the server validates them);
    nghttp2's binding produces the same sequence for the same frames."""
    out: list[Event] = []
    add = out.append
    ended_on_headers = 0  # h2 follows END_STREAM on HEADERS with a StreamEnded: not news
    for event in events:
        if isinstance(event, h2.events.DataReceived):
            flow_len = event.flow_controlled_length
            # an empty DATA frame that ends the stream is only its END (as nghttp2 says)
            if event.data or flow_len or event.stream_ended is None:
                add(Event(ev.DATA, event.stream_id, data=event.data, flow_len=flow_len))
        elif isinstance(event, h2.events.StreamEnded):
            if event.stream_id != ended_on_headers:
                add(Event(ev.END, event.stream_id))
        elif isinstance(event, h2.events.RequestReceived):
            if event.stream_ended is not None:
                ended_on_headers = event.stream_id
            if request is not None:
                headers_event = request(event)
                if headers_event is not None:
                    add(headers_event)
        elif isinstance(
            event, (h2.events.ResponseReceived, h2.events.InformationalResponseReceived)
        ):
            status, regular = split_response(event.headers)
            ended = getattr(event, "stream_ended", None) is not None
            if ended:
                ended_on_headers = event.stream_id
            add(Event(ev.HEADERS, event.stream_id, end_stream=ended, headers=regular,
                      status=status))  # fmt: skip
        elif isinstance(event, h2.events.StreamReset):
            code = int(event.error_code)
            if event.remote_reset:
                add(Event(ev.RESET, event.stream_id, error_code=code))
            add(Event(ev.CLOSE, event.stream_id, error_code=code))
        elif isinstance(event, h2.events.WindowUpdated):
            add(Event(ev.WINDOW_UPDATE, event.stream_id))
        elif isinstance(event, h2.events.PingReceived):
            add(Event(ev.PING))
        elif isinstance(event, h2.events.PingAckReceived):
            add(Event(ev.PING_ACK, data=event.ping_data))
        elif isinstance(event, h2.events.RemoteSettingsChanged):
            add(Event(ev.SETTINGS))
        elif isinstance(event, h2.events.PriorityUpdated):
            add(Event(ev.PRIORITY, event.stream_id))
        elif isinstance(event, h2.events.ConnectionTerminated):
            add(Event(ev.GOAWAY, last_stream_id=event.last_stream_id or 0,
                      error_code=int(event.error_code or 0),
                      data=event.additional_data or b""))  # fmt: skip
        # TrailersReceived: dropped (the stream's END follows); SettingsAcknowledged,
        # UnknownFrameReceived and the rest change nothing the gateway acts on
    return out


def split_request(headers: Headers) -> tuple[str, str, str, Headers]:
    """(method, path, authority, regular fields) of a request's header list (the
    nghttp2 engine does this in C)."""
    method = target = authority = ""
    regular: Headers = []
    for name, value in headers:
        if name[:1] == b":":
            if name == b":method":
                method = value.decode("latin-1")
            elif name == b":path":
                target = value.decode("latin-1")
            elif name == b":authority":
                authority = value.decode("latin-1")
        else:
            regular.append((name, value))
    return method, target, authority, regular


def split_response(headers: Headers) -> tuple[int, Headers]:
    """(status, regular fields) of a response's header list (nghttp2 does this in C)."""
    status = 0
    regular: Headers = []
    for name, value in headers:
        if name == b":status":
            status = int(value)
        elif name[:1] != b":":
            regular.append((name, value))
    return status, regular


PendingData = deque[tuple["bytes | memoryview", "Callable[[], None] | None"]]


def send_pending(conn: h2.connection.H2Connection, stream_id: int, pending: PendingData) -> bool:
    """Send one stream's queued data as far as its flow-control window allows.

    Each queued item's callback runs once the item is fully handed to h2. Returns True
    when the queue is empty. h2 errors for a stream that is gone propagate to the caller.
    """
    while pending:
        window = conn.local_flow_control_window(stream_id)
        if window <= 0:
            return False
        data, callback = pending[0]
        size = min(len(data), window, conn.max_outbound_frame_size)
        if size < len(data):  # send a frame's worth; keep the rest as a view (no copy)
            view = memoryview(data)
            conn.send_data(stream_id, view[:size].tobytes())
            pending[0] = (view[size:], callback)
        else:
            conn.send_data(stream_id, data if isinstance(data, bytes) else bytes(data))
            pending.popleft()
            if callback is not None:
                callback()
    return True


class BlockedStreams:
    """Mixin of both h2 engines' connections: the streams whose queued data waits for
    flow-control window (or for a paused transport), sent on when window opens or the
    transport drains. The engine supplies `_flush_stream(stream)`."""

    _blocked: set[int]
    streams: dict[int, Any]

    def _track_blocked(self, stream_id: int, pending: PendingData) -> None:
        """After a send: still waiting (data left, stream alive), or not."""
        if pending and stream_id in self.streams:
            self._blocked.add(stream_id)
        else:
            self._blocked.discard(stream_id)

    def _window_opened(self, stream_id: int) -> None:
        """WINDOW_UPDATE: on the connection, every waiting stream may go on; on a stream,
        that one, if it has data."""
        if stream_id == 0:
            for waiting in list(self._blocked):
                stream = self.streams.get(waiting)
                if stream is not None:
                    self._flush_stream(stream)  # type: ignore[attr-defined]
            return
        stream = self.streams.get(stream_id)
        if stream is not None and stream.pending:
            self._flush_stream(stream)  # type: ignore[attr-defined]

    def _resumed(self) -> None:
        self._window_opened(0)
        self._write_out()  # type: ignore[attr-defined]
