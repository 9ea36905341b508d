"""What a peer did on an HTTP/2 connection, in one vocabulary for both engines.

Each engine turns what it parsed into `EngineEvent` records: the nghttp2 binding gathers
them in C (`_nghttp2.Event`, one per frame event, never one per header), the h2 engine
translates h2's events into `Event`. The shared connection classes act on them in one
place per side (`HTTP2ServerConnection._handle`, `HTTP2ClientConnection._handle`), which
is also the one place that charges the abuse budgets. Engines differ only in how they
parse and frame, never in what an event means (as hypercorn's `events.py` is the one
vocabulary between its protocol modules and its streams).

A record carries only the fields its kind uses; the others keep their defaults.
"""

from __future__ import annotations

from typing import Final, Protocol

from kom_gateway.http.stream import Headers

# kinds; the nghttp2 binding declares the same numbers (tests/test_engine_events.py)
HEADERS: Final = 1  # stream_id, end_stream; a request's method/path/authority or a
# response's status (a 1xx first, then the final one); `headers`: the regular fields,
# None when the block was over SETTINGS_MAX_HEADER_LIST_SIZE
DATA: Final = 2  # stream_id, data, flow_len (what it cost the window, padding included);
# no data and flow_len 0: an empty DATA frame without END_STREAM (a flood's unit)
END: Final = 3  # stream_id: the peer ended its side (on DATA or trailers)
CLOSE: Final = 4  # stream_id, error_code: the stream is gone (0: both sides ended)
GOAWAY: Final = 5  # last_stream_id, error_code, data (the debug data)
PING_ACK: Final = 6  # data: the payload of our PING
SETTINGS: Final = 7  # the peer's SETTINGS (not an ACK); the engine has applied them
RESET: Final = 8  # stream_id, error_code: the peer sent RST_STREAM (a CLOSE follows)
PING: Final = 9  # the peer sent a PING (the engine has queued its ACK)
WINDOW_UPDATE: Final = 10  # stream_id (0: the connection): the peer opened a window
PRIORITY: Final = 11  # a PRIORITY frame (ignored, but it costs a budget)

NAMES: Final = {
    HEADERS: "HEADERS", DATA: "DATA", END: "END", CLOSE: "CLOSE", GOAWAY: "GOAWAY",
    PING_ACK: "PING_ACK", SETTINGS: "SETTINGS", RESET: "RESET", PING: "PING",
    WINDOW_UPDATE: "WINDOW_UPDATE", PRIORITY: "PRIORITY",
}  # fmt: skip


class EngineEvent(Protocol):
    """The fields of an event, read-only; `_nghttp2.Event` and `Event` both have them."""

    @property
    def kind(self) -> int: ...
    @property
    def stream_id(self) -> int: ...
    @property
    def end_stream(self) -> bool: ...
    @property
    def headers(self) -> Headers | None: ...
    @property
    def method(self) -> str: ...
    @property
    def path(self) -> str: ...
    @property
    def authority(self) -> str: ...
    @property
    def status(self) -> int: ...
    @property
    def data(self) -> bytes: ...
    @property
    def flow_len(self) -> int: ...
    @property
    def error_code(self) -> int: ...
    @property
    def last_stream_id(self) -> int: ...


class Event:
    """An engine event made in Python (the h2 engine's, and tests')."""

    __slots__ = (
        "authority",
        "data",
        "end_stream",
        "error_code",
        "flow_len",
        "headers",
        "kind",
        "last_stream_id",
        "method",
        "path",
        "status",
        "stream_id",
    )

    def __init__(
        self,
        kind: int,
        stream_id: int = 0,
        *,
        end_stream: bool = False,
        headers: Headers | None = None,
        method: str = "",
        path: str = "",
        authority: str = "",
        status: int = 0,
        data: bytes = b"",
        flow_len: int = 0,
        error_code: int = 0,
        last_stream_id: int = 0,
    ) -> None:
        self.kind = kind
        self.stream_id = stream_id
        self.end_stream = end_stream
        self.headers = headers
        self.method = method
        self.path = path
        self.authority = authority
        self.status = status
        self.data = data
        self.flow_len = flow_len
        self.error_code = error_code
        self.last_stream_id = last_stream_id

    def __repr__(self) -> str:
        return f"Event({NAMES.get(self.kind, self.kind)}, stream {self.stream_id})"
