"""HTTP/1.1 on aiohttp, presented as a ServerStream.

aiohttp parses the request; the stream's callbacks queue operations that one writer
coroutine per request (the aiohttp handler itself) applies to a StreamResponse, so
back-pressure comes from awaiting aiohttp's drain, and `on_flushed` fires after it.
A request with `Upgrade` (exec, attach, port-forward) is a stream like any other; the
proxy either answers it or calls `switch_protocols`, and the splice of the two
connections happens here, where aiohttp's connection is.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, cast

from aiohttp import web
from aiohttp.http_exceptions import LineTooLong
from aiohttp.web_protocol import RequestHandler
from multidict import CIMultiDict

from kom_gateway import compat
from kom_gateway.http.settings import ConnectionLimits
from kom_gateway.http.stream import Flushed, Headers, ServerStream
from kom_gateway.kube.identity import PeerIdentity, identity_of_ssl
from kom_gateway.kube.status import status_body

log = logging.getLogger(__name__)
StreamHandler = Callable[[ServerStream], None]
MAX_FIELD_BYTES = 64 * 1024  # one header line
MAX_HEADERS = 100  # header lines: with MAX_FIELD_BYTES, bounds what one request can buffer
UpgradeHandler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]

# Framing is aiohttp's job on this side; these must not be copied from upstream.
_FRAMING = frozenset({b"transfer-encoding", b"connection", b"keep-alive", b"content-length"})
# A 101's own headers (Connection, Upgrade, protocol versions) are relayed; not these.
_SWITCH_DROPS = frozenset({b"content-length", b"transfer-encoding", b"date", b"server"})
SPLICE_HIGH_WATER = 1024 * 1024  # client bytes queued upstream before reading pauses
SPLICE_LINGER = 5.0  # after the upstream's end, how long the client may take to finish


class H1ServerStream(ServerStream):
    def __init__(self, request: web.BaseRequest) -> None:
        super().__init__()
        self.request = request
        self.http_version = "1.1"
        self.method = request.method
        self.target = request.raw_path
        self.authority = request.host
        self.headers = [(name.lower(), value) for name, value in request.raw_headers]
        self.remote_addr = request.remote or ""
        self.ssl_object, self.peer = request_tls(request)
        # asks to switch protocols (exec, attach, port-forward): see `switch_protocols`
        self.upgrade = "Upgrade" in request.headers
        self._ops: deque[tuple] = deque()
        self._wakeup = asyncio.Event()
        self._content_length: bytes | None = None

    def ack_body(self, flow_len: int) -> None:
        """aiohttp applies back-pressure by how fast we read; nothing to do."""

    def start_response(self, status: int, headers: Headers, end_stream: bool = False) -> None:
        if self.closed or self.response_started:
            return
        self.response_started = True
        self._push(("start", status, headers, end_stream))

    def write(self, data: bytes, on_flushed: Flushed | None = None) -> None:
        if not self.closed:
            self._push(("data", data, on_flushed))
        elif on_flushed is not None:
            on_flushed()  # never sent, but done with: its producer gets its credit back

    def end(self) -> None:
        if not self.closed:
            if not self.response_started:
                self.start_response(200, [], end_stream=True)
            else:
                self._push(("end",))

    def reset(self) -> None:
        if not self.closed:
            self._push(("reset",))

    def switch_protocols(
        self, headers: Headers, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """Answer 101 with `headers`, then carry bytes both ways between the client's
        connection and (`reader`, `writer`) until both sides are done. The stream closes
        when the splice ends."""
        if not self.closed and not self.response_started:
            self.response_started = True
            self._push(("switch", headers, reader, writer))

    def _push(self, op: tuple) -> None:
        self._ops.append(op)
        self._wakeup.set()

    async def pump_body(self) -> None:
        """Feed the request body to the consumer as aiohttp reads it."""
        content = self.request.content
        try:
            while True:
                chunk = await content.readany()
                if not chunk:
                    break
                self._deliver_body(chunk, len(chunk))
        except (ConnectionError, asyncio.CancelledError):
            self._mark_closed()
            return
        self._deliver_body_end()

    async def serve(self) -> web.StreamResponse:
        """Apply queued response operations until the response ends."""
        request = self.request
        response: web.StreamResponse | None = None
        try:
            while True:
                while not self._ops:
                    self._wakeup.clear()
                    await self._wakeup.wait()
                op = self._ops.popleft()
                kind = op[0]
                if kind == "data":
                    assert response is not None
                    try:
                        await response.write(op[1])
                    finally:  # written, or never will be: done with it either way
                        if op[2] is not None:
                            op[2]()
                elif kind == "start":
                    _, status, headers, end_stream = op
                    response = _response(status, headers)
                    if getattr(request.protocol, "closing", False):  # draining: the last
                        response.force_close()
                    await response.prepare(request)
                    if end_stream:
                        await response.write_eof()
                        return response
                elif kind == "end":
                    assert response is not None
                    await response.write_eof()
                    return response
                elif kind == "switch":
                    return await _splice(request, *op[1:])
                else:  # reset: the client must see a broken response, not a clean end
                    if request.transport is not None:
                        request.transport.abort()
                    raise ConnectionResetError("response aborted")
        finally:
            self._mark_closed()
            # data never written is still done with: its producer gets its credit back
            ops, self._ops = self._ops, deque()
            for op in ops:
                if op[0] == "data" and op[2] is not None:
                    op[2]()


class _ToUpstream:
    """aiohttp payload parser that forwards the client's bytes upstream once protocols
    switched. Detached when the splice ends, so that the client connection's own end
    (which aiohttp reports afterwards) never touches a closed upstream connection."""

    def __init__(self, writer: asyncio.StreamWriter, client: asyncio.Transport) -> None:
        self.writer = writer
        self.client = client
        self.eof = asyncio.Event()  # the client finished sending
        self.detached = False

    def feed_data(self, data: bytes) -> tuple[bool, bytes]:
        if self.detached or self.writer.is_closing():
            return False, b""
        self.writer.write(data)
        if self.writer.transport.get_write_buffer_size() > SPLICE_HIGH_WATER:
            self.client.pause_reading()
            asyncio.get_running_loop().create_task(self._resume_when_drained())
        return False, b""

    async def _resume_when_drained(self) -> None:
        try:
            await self.writer.drain()
        except OSError:
            pass
        finally:
            if not self.client.is_closing():
                self.client.resume_reading()

    def feed_eof(self) -> None:
        self.eof.set()
        if self.detached or self.writer.is_closing():
            return
        if self.writer.can_write_eof():
            self.writer.write_eof()  # half-close: the upstream may still answer

    def detach(self) -> None:
        self.detached = True


async def _splice(
    request: web.BaseRequest,
    headers: Headers,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
) -> web.StreamResponse:
    """101, then bytes both ways as a TCP splice does: each side's end is passed on as a
    half-close, and both connections close once the two directions are done (or the
    client has not finished `SPLICE_LINGER` seconds after the upstream did)."""
    response = web.StreamResponse(status=101, reason="Switching Protocols")
    for name, value in headers:
        if name.lower() not in _SWITCH_DROPS:
            response.headers.add(name.decode("latin-1"), value.decode("latin-1"))
    await response.prepare(request)
    transport = cast(asyncio.Transport, request.transport)
    protocol = request.protocol
    to_upstream = _ToUpstream(writer, transport)
    protocol.set_parser(to_upstream)  # type: ignore[arg-type]
    try:
        while chunk := await reader.read(65536):
            transport.write(chunk)
            if protocol.writing_paused:
                await compat.drain_writes(protocol)
        if transport.can_write_eof() and not transport.is_closing():
            transport.write_eof()  # the upstream is done: so are we, towards the client
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(SPLICE_LINGER):
                await to_upstream.eof.wait()
    except (OSError, asyncio.CancelledError):
        pass
    finally:
        to_upstream.detach()
        writer.close()
        if not transport.is_closing():
            transport.close()
    return response


def request_tls(request: web.BaseRequest) -> tuple[ssl.SSLObject | None, PeerIdentity | None]:
    """The TLS of an HTTP/1.1 request's connection and the client's verified identity,
    worked out once per connection (not per keep-alive request)."""
    protocol = request.protocol
    if isinstance(protocol, _RequestHandler):
        return protocol.ssl_object, protocol.peer
    transport = request.transport
    ssl_object = transport.get_extra_info("ssl_object") if transport else None
    return ssl_object, identity_of_ssl(ssl_object)


def _status_response(status: int, reason: str, message: str) -> web.Response:
    return web.Response(
        status=status, body=status_body(status, reason, message), content_type="application/json"
    )


def _response(status: int, headers: Headers) -> web.StreamResponse:
    out: CIMultiDict[str] = CIMultiDict()
    length = None
    for name, value in headers:
        if name == b"content-length":
            length = int(value)
        elif name not in _FRAMING:
            out.add(name.decode("latin-1"), value.decode("latin-1"))
    response = web.StreamResponse(status=status, headers=out)
    if length is not None:
        response.content_length = length
    return response


class _RequestHandler(RequestHandler):
    """aiohttp's connection handler, plus what a gateway owes its clients: parse errors
    answered as Kubernetes Status JSON (no tracebacks, no parser internals), a deadline
    for every request's headers (slowloris, also on a keep-alive connection: as Go's
    ReadHeaderTimeout, counted from the first byte of the request), and a hook when the
    connection ends."""

    header_timeout: float = 0.0
    on_lost: Callable[[asyncio.BaseTransport], None] | None = None
    opened = 0.0  # loop time of connection_made

    @property
    def requests_seen(self) -> int:
        """Requests whose headers have arrived on this connection."""
        return compat.requests_seen(self)  # (aiohttp's own count)

    closing = False  # draining: its first request is its last (see _Server.pre_shutdown)
    ssl_object: ssl.SSLObject | None = None
    peer: PeerIdentity | None = None
    _header_timer: asyncio.TimerHandle | None = None
    _answered = 0  # requests whose handler has finished

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.opened = asyncio.get_running_loop().time()
        self.ssl_object = transport.get_extra_info("ssl_object")
        self.peer = identity_of_ssl(self.ssl_object)
        self._arm_header_deadline()  # the first request: from the connection's start

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.closing and self.requests_seen:
            # draining: this request is its last. (Set only now: aiohttp ignores data
            # that arrives once a connection is closing, the first request's too.)
            self._close = True
        if self.requests_seen > self._answered:  # a request's headers are all in
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None
        elif data and self._header_timer is None:  # the first bytes of the next request
            self._arm_header_deadline()

    def request_answered(self) -> None:
        """The handler of one request finished: the next one's headers get a deadline of
        their own once their first byte arrives (until then the idle timeout applies)."""
        self._answered += 1

    def _arm_header_deadline(self) -> None:
        if self.header_timeout > 0 and self.transport is not None:
            self._header_timer = asyncio.get_running_loop().call_later(
                self.header_timeout, self._header_deadline, self.requests_seen
            )

    def _header_deadline(self, count: int) -> None:
        self._header_timer = None
        transport = self.transport
        if self.requests_seen == count and transport is not None and not transport.is_closing():
            log.info("no complete request headers within %ss: closing", self.header_timeout)
            transport.close()

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
        transport = self.transport
        super().connection_lost(exc)
        if self.on_lost is not None and transport is not None:
            self.on_lost(transport)

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if isinstance(exc, LineTooLong):
            status, reason = 431, "RequestHeaderFieldsTooLarge"
            text = "request headers too large"
        elif isinstance(exc, ConnectionError):  # the client left mid-response
            log.debug("HTTP/1.1 client went away: %s", exc)
            reason, text = "InternalError", "connection lost"
        elif status == 500:
            log.error("HTTP/1.1 request failed", exc_info=exc)
            reason, text = "InternalError", "the gateway failed to handle the request"
        else:
            reason = "BadRequest"
            first = (message or "").splitlines()[0] if message else ""
            text = f"malformed HTTP/1.1 request: {first[:200]}".rstrip(": ")
            log.debug("bad HTTP/1.1 request from %s: %s", request.remote, message)
        response = _status_response(status, reason, text)
        response.force_close()
        return response


FRESH_GRACE = 5.0  # Go's Shutdown treats a new connection as idle after 5 s


def awaiting_first_request(server: web.Server) -> bool:
    """Draining, a connection of `server` still waits for its first request."""
    return any(
        isinstance(conn, _RequestHandler) and conn.closing and not conn.requests_seen
        for conn in server.connections
    )


class _Server(web.Server):
    """aiohttp's low-level server, making `_RequestHandler`s."""

    def __init__(
        self,
        handler: Callable[[web.BaseRequest], Awaitable[web.StreamResponse]],
        header_timeout: float,
        on_lost: Callable[[asyncio.BaseTransport], None] | None,
        **kwargs: Any,
    ) -> None:
        super().__init__(handler, **kwargs)
        self._header_timeout = header_timeout
        self._on_lost = on_lost
        self.draining = False

    def __call__(self) -> RequestHandler:
        protocol = cast(_RequestHandler, compat.new_request_handler(self, _RequestHandler))
        protocol.header_timeout = self._header_timeout
        protocol.on_lost = self._on_lost
        protocol.closing = self.draining  # told apart from HTTP/2 after the drain began
        return protocol

    def pre_shutdown(self) -> None:
        """Drain: idle keep-alive connections close now. A connection that has not sent
        its first request yet is not idle: it may have been accepted a moment before
        the drain, its request on the way (a restart in place under a connection-per-
        request load). As Go's Shutdown, such a connection is given FRESH_GRACE seconds
        (within its header deadline) and its first request is answered, with
        `Connection: close`, before it closes."""
        self.draining = True
        now = compat.server_loop_time(self)
        for conn in compat.server_connections(self):
            if (
                isinstance(conn, _RequestHandler)
                and not conn.requests_seen
                and now - conn.opened < FRESH_GRACE
            ):
                conn.closing = True  # (closed after its first request: data_received)
            else:
                conn.close()


def aiohttp_server(
    handler: StreamHandler,
    upgrade_handler: UpgradeHandler | None = None,
    max_header_bytes: int = ConnectionLimits.max_header_bytes,
    header_timeout: float = 32.0,
    idle_timeout: float = 90.0,
    on_lost: Callable[[asyncio.BaseTransport], None] | None = None,
) -> web.Server:
    """An aiohttp low-level server that hands every request to `handler` as a stream."""

    async def handle(request: web.BaseRequest) -> web.StreamResponse:
        try:
            return await serve(request)
        finally:
            if isinstance(request.protocol, _RequestHandler):
                request.protocol.request_answered()

    async def serve(request: web.BaseRequest) -> web.StreamResponse:
        size = len(request.raw_path) + sum(len(n) + len(v) + 4 for n, v in request.raw_headers)
        if size > max_header_bytes:
            return _status_response(431, "RequestHeaderFieldsTooLarge", "request headers too large")
        stream = H1ServerStream(request)
        if stream.upgrade:
            if upgrade_handler is not None:  # a server that handles upgrades itself
                return await upgrade_handler(request)
            handler(stream)  # the proxy carries it: `switch_protocols`, or an answer
            return await stream.serve()
        body_task = asyncio.get_running_loop().create_task(stream.pump_body())
        try:
            handler(stream)
            return await stream.serve()
        finally:
            body_task.cancel()

    return _Server(
        handle,
        header_timeout,
        on_lost,
        handler_cancellation=True,
        access_log=None,
        keepalive_timeout=idle_timeout,
        # the request line may carry a long query; single headers (tokens, certificates)
        # stay far smaller; `handle` then holds the whole header list to max_header_bytes
        max_line_size=max_header_bytes,
        max_field_size=min(max_header_bytes, MAX_FIELD_BYTES),
        max_headers=MAX_HEADERS,
    )
