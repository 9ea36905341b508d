"""HTTP/1.1 on aiohttp, presented as a ServerStream.

aiohttp parses the request; the stream's callbacks queue operations that one writer
coroutine per request (the aiohttp handler itself) applies to a StreamResponse, so
back-pressure comes from awaiting aiohttp's drain, and `on_flushed` fires after it.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable

from aiohttp import web
from multidict import CIMultiDict

from kom_gateway.http.stream import Flushed, Headers, ServerStream

StreamHandler = Callable[[ServerStream], None]
UpgradeHandler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]

# Framing is aiohttp's job on this side; these must not be copied from upstream.
_FRAMING = frozenset({b"transfer-encoding", b"connection", b"keep-alive", b"content-length"})


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
        transport = request.transport
        ssl_object = transport.get_extra_info("ssl_object") if transport else None
        self.peer_cert = (ssl_object.getpeercert() or None) if ssl_object else None
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

    def end(self) -> None:
        if not self.closed:
            if not self.response_started:
                self.start_response(200, [], end_stream=True)
            else:
                self._push(("end",))

    def reset(self) -> None:
        if not self.closed:
            self._push(("reset",))

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
                    await response.write(op[1])
                    if op[2] is not None:
                        op[2]()
                elif kind == "start":
                    _, status, headers, end_stream = op
                    response = _response(status, headers)
                    await response.prepare(request)
                    if end_stream:
                        await response.write_eof()
                        return response
                elif kind == "end":
                    assert response is not None
                    await response.write_eof()
                    return response
                else:  # reset: the client must see a broken response, not a clean end
                    if request.transport is not None:
                        request.transport.abort()
                    raise ConnectionResetError("response aborted")
        finally:
            self._mark_closed()


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


def aiohttp_server(
    handler: StreamHandler,
    upgrade_handler: UpgradeHandler | None = None,
    **kwargs: object,
) -> web.Server:
    """An aiohttp low-level server that hands every request to `handler` as a stream."""

    async def handle(request: web.BaseRequest) -> web.StreamResponse:
        if upgrade_handler is not None and request.headers.get("Upgrade"):
            return await upgrade_handler(request)
        stream = H1ServerStream(request)
        body_task = asyncio.get_running_loop().create_task(stream.pump_body())
        try:
            handler(stream)
            return await stream.serve()
        finally:
            body_task.cancel()

    kwargs.setdefault("max_line_size", 64 * 1024)
    kwargs.setdefault("max_field_size", 64 * 1024)
    return web.Server(handle, handler_cancellation=True, access_log=None, **kwargs)
