"""h2 connection objects with a graceful GOAWAY and the settings both sides share."""

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

from kom_gateway.http.hpack_encoder import MEMO_MAX_BYTES, StatelessEncoder


def _memoize_huffman_decoding() -> None:
    """hpack decodes Huffman literals in pure Python, per character. Go and nginx send
    response headers as Huffman literals *without* indexing, so the same few strings
    (content-type, a Date that changes once a second, ...) are decoded on every request.
    The decoder is a pure function of its bytes (hpack slices bytes, never views), so an
    LRU memo is exact. Measured: a quarter of the proxy's CPU before, near zero after."""
    import functools

    import hpack.hpack

    if hasattr(hpack.hpack.decode_huffman, "memoized"):
        return
    decode = hpack.hpack.decode_huffman
    cached = functools.lru_cache(maxsize=4096)(decode)

    def decode_huffman(data: bytes) -> bytes:
        # only short strings repeat; a long one would pin its bytes in the memo
        return cached(data) if len(data) <= MEMO_MAX_BYTES else decode(data)

    decode_huffman.memoized = True  # type: ignore[attr-defined]
    hpack.hpack.decode_huffman = decode_huffman


_memoize_huffman_decoding()


def _silence_hpack_debug_logging() -> None:
    """hpack calls `log.debug` for every header and integer it codes (64 calls for a
    small proxied request, ~4% of the CPU even with debug logging off). Its debug output
    is of no use to an operator; a no-op logger removes the calls' cost."""
    import hpack.hpack

    class _Silent:
        def debug(self, *args: object, **kwargs: object) -> None:
            pass

    hpack.hpack.log = _Silent()  # type: ignore[assignment]


_silence_hpack_debug_logging()

log = logging.getLogger(__name__)

# What h2 raises when a stream is already gone (reset, ended, never existed).
STREAM_GONE = (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError, KeyError)


class GracefulH2Connection(h2.connection.H2Connection):
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
        self._data_to_send += frame.serialize()
        return last_stream_id

    def _receive_goaway_frame(self, frame: Any) -> tuple[list[Any], list[Any]]:
        event = h2.events.ConnectionTerminated()
        try:
            event.error_code = ErrorCodes(frame.error_code)
        except ValueError:
            event.error_code = frame.error_code
        event.last_stream_id = frame.last_stream_id
        event.additional_data = frame.additional_data or None
        return [], [event]


def make_connection(
    *,
    client_side: bool,
    max_concurrent_streams: int,
    initial_window: int,
    max_frame_size: int = 16384,
    max_header_list_size: int = 1 << 20,
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
