"""What every HTTP/2 connection does with its transport, either side, any engine: one
write per connection per event-loop pass (the frames one read produces, or many streams
queue, leave together), and PING keepalive (after `interval` s without a frame from the
peer, PING it; no ACK within `timeout` s means the peer is gone: close, which ends its
streams). RFC 9113 error codes the engines send live here too."""

from __future__ import annotations

import asyncio
import logging
import time

from mypy_extensions import mypyc_attr

log = logging.getLogger(__name__)

NO_ERROR = 0x0
PROTOCOL_ERROR = 0x1
INTERNAL_ERROR = 0x2
REFUSED_STREAM = 0x7
CANCEL = 0x8
ENHANCE_YOUR_CALM = 0xB
KEEPALIVE_PING = b"komgw\x00\x00\x00"


@mypyc_attr(allow_interpreted_subclasses=True)  # the h2 / HTTP/1.1 engines extend it
class H2Transport(asyncio.Protocol):
    _loop: asyncio.AbstractEventLoop  # set in connection_made (get_running_loop() costs a
    # getpid() system call in CPython 3.11, and _write_out runs several times a request)

    def __init__(self) -> None:
        # set here, not as class-level defaults: see ServerStream.__init__
        self.transport: asyncio.Transport | None = None
        self._flush_handle: asyncio.Handle | None = None
        self._ping_ack: asyncio.Future[None] | None = None
        self._keepalive_task: asyncio.Task[None] | None = None
        self._last_read = 0.0

    def _send_ping(self, payload: bytes) -> None:
        raise NotImplementedError

    def _data_to_send(self) -> bytes:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def _peer_name(self) -> str:
        raise NotImplementedError

    def _window_opened(self, stream_id: int) -> None:
        """The peer sent WINDOW_UPDATE (0: for the connection). Engines that hold data
        for the window send it on here; nghttp2 does that itself."""

    # -- write coalescing ----------------------------------------------------------------
    def _write_out(self) -> None:
        if self._flush_handle is None and self.transport is not None:
            self._flush_handle = self._loop.call_soon(self._flush_now)

    def _flush_now(self) -> None:
        self._flush_handle = None
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        data = self._data_to_send()
        if data:
            transport.write(data)

    # -- keepalive -----------------------------------------------------------------------
    def _start_keepalive(self, interval: float, timeout: float) -> None:
        if interval > 0:
            self._keepalive_task = asyncio.get_running_loop().create_task(
                self._keepalive(interval, timeout)
            )

    def _stop_transport_timers(self) -> None:
        if self._keepalive_task is not None:
            self._keepalive_task.cancel()
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None

    def _keepalive_acked(self) -> None:
        if self._ping_ack is not None and not self._ping_ack.done():
            self._ping_ack.set_result(None)

    async def _keepalive(self, interval: float, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        while True:
            idle = time.monotonic() - self._last_read
            if idle < interval:
                await asyncio.sleep(interval - idle)
                continue
            self._ping_ack = loop.create_future()
            self._send_ping(KEEPALIVE_PING)
            self._write_out()
            try:
                async with asyncio.timeout(timeout):
                    await self._ping_ack
            except TimeoutError:
                peer = self._peer_name()
                log.warning("%s did not answer PING within %ss: closing", peer, timeout)
                self.close()
                return
