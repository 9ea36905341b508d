"""The one request/response interface the proxy core and the simulator program against.

HTTP/2 streams and HTTP/1.1 requests both present themselves as a `ServerStream`. Data
moves by callbacks, not coroutines: a write says what to call once the bytes have left
for the client, which is when the proxy acknowledges them upstream (end-to-end flow
control with no per-frame task).
"""

from __future__ import annotations

import asyncio
import ssl
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Protocol

from mypy_extensions import mypyc_attr

from kom_gateway.kube.identity import PeerIdentity

Headers = list[tuple[bytes, bytes]]  # lower-case names; values as received
Flushed = Callable[[], None]


class BodyConsumer(Protocol):
    """Who reads a request: its body, its end, and the stream closing (answered and
    done, reset, or the client gone), whichever comes first."""

    def on_body(self, data: bytes, flow_len: int) -> None: ...
    def on_body_end(self) -> None: ...
    def on_stream_closed(self) -> None: ...


class StreamClosed(Exception):
    """The client went away (reset, disconnect) before the exchange finished."""


@mypyc_attr(allow_interpreted_subclasses=True)  # the h2 / HTTP/1.1 engines extend it
class ServerStream(ABC):
    """One client request and the sink for its response."""

    method: str
    target: str  # path with query, as sent
    authority: str
    headers: Headers
    remote_addr: str
    http_version: str  # "2" or "1.1"
    peer: PeerIdentity | None  # from a verified client certificate, if any
    ssl_object: ssl.SSLObject | None  # the connection's TLS, if any

    def __init__(self) -> None:
        # set here, not as class-level defaults: compiled, the class is native and an
        # interpreted engine's subclass would not get those
        self._consumer: BodyConsumer | None = None
        self._early: list[tuple[bytes, int]] | None = None  # body that came before a consumer
        self._body_done = False
        self._closed_callbacks: list[Callable[[], None]] | None = None
        self.closed = False
        self.response_started = False
        self.upgrade = False  # an HTTP/1.1 request asking to switch protocols

    def goaway_connection(self, reason: str) -> None:  # noqa: B027 (a no-op by default)
        """Ask the client to take its next requests to a new connection, gracefully
        (HTTP/2: GOAWAY; this request and the others in flight finish). HTTP/1.1
        connections are left alone: the clients that use them hold them briefly."""

    # -- request body ------------------------------------------------------------------
    def set_body_consumer(self, consumer: BodyConsumer) -> None:
        """Deliver the body to `consumer`, starting with anything already received."""
        self._consumer = consumer
        early, self._early = self._early, None
        for data, flow_len in early or ():
            consumer.on_body(data, flow_len)
        if self._body_done:
            consumer.on_body_end()
        if self.closed:  # gone already
            self._consumer = None
            consumer.on_stream_closed()

    def _deliver_body(self, data: bytes, flow_len: int) -> None:
        if self.closed:  # answered and gone: the rest of the body has no reader
            return
        if self._consumer is None:
            if self._early is None:
                self._early = []
            self._early.append((data, flow_len))
        else:
            self._consumer.on_body(data, flow_len)

    def _deliver_body_end(self) -> None:
        self._body_done = True
        if self._consumer is not None:
            self._consumer.on_body_end()

    @property
    def body_done(self) -> bool:
        return self._body_done

    async def read_body(self, limit: int) -> bytes:
        """Whole body (for small request bodies: the simulator, error paths)."""
        reader = _BodyCollector(self, limit)
        self.set_body_consumer(reader)
        return await reader.done

    @abstractmethod
    def ack_body(self, flow_len: int) -> None:
        """The body bytes were consumed: let the client send more."""

    # -- client going away -------------------------------------------------------------
    def on_closed(self, callback: Callable[[], None]) -> None:
        if self.closed:
            callback()
        elif self._closed_callbacks is None:
            self._closed_callbacks = [callback]
        else:
            self._closed_callbacks.append(callback)

    def _mark_closed(self) -> None:
        if self.closed:
            return
        self.closed = True
        # nothing more can arrive: tell the consumer, and let it go by refcount
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            consumer.on_stream_closed()
        callbacks, self._closed_callbacks = self._closed_callbacks, None
        for callback in callbacks or ():
            callback()

    # -- response ----------------------------------------------------------------------
    @abstractmethod
    def start_response(self, status: int, headers: Headers, end_stream: bool = False) -> None: ...

    @abstractmethod
    def write(self, data: bytes, on_flushed: Flushed | None = None) -> None:
        """Queue `data`; `on_flushed` runs once it has been handed to the client."""

    @abstractmethod
    def end(self) -> None:
        """End the response cleanly once queued data is out."""

    @abstractmethod
    def reset(self) -> None:
        """Abort the response: the client sees a broken stream, never a clean end."""

    def switch_protocols(
        self, headers: Headers, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """Upgrade requests only: answer 101 with `headers`, then splice the client's
        connection with (`reader`, `writer`) until both are done; the stream then closes."""
        raise NotImplementedError("only HTTP/1.1 streams switch protocols")

    async def send(self, data: bytes) -> None:
        """Write and wait until flushed (simple handlers: the simulator)."""
        if self.closed:
            raise StreamClosed()
        loop = asyncio.get_running_loop()
        flushed = loop.create_future()
        self.write(data, lambda: _settle(flushed))
        closed = loop.create_future()
        self.on_closed(lambda: _settle(closed))
        await asyncio.wait((flushed, closed), return_when=asyncio.FIRST_COMPLETED)
        if not flushed.done():
            raise StreamClosed()


class _BodyCollector:
    def __init__(self, stream: ServerStream, limit: int) -> None:
        self.stream = stream
        self.limit = limit
        self.parts: list[bytes] = []
        self.size = 0
        self.done: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    def on_body(self, data: bytes, flow_len: int) -> None:
        self.size += len(data)
        self.stream.ack_body(flow_len)
        if self.size > self.limit:
            if not self.done.done():
                self.done.set_exception(BodyTooLarge(self.limit))
            return
        self.parts.append(data)

    def on_body_end(self) -> None:
        if not self.done.done():
            self.done.set_result(b"".join(self.parts))

    def on_stream_closed(self) -> None:
        if not self.done.done():
            self.done.set_exception(StreamClosed())


class BodyTooLarge(Exception):
    def __init__(self, limit: int) -> None:
        super().__init__(f"request body larger than {limit} bytes")
        self.limit = limit


def _settle(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
