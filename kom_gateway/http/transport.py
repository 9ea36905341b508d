"""What every HTTP/2 connection does with its transport, either side, any engine: one
write per connection per event-loop pass (the frames one read produces, or many streams
queue, leave together), and PING keepalive (after `interval` s without a frame from the
peer, PING it; no ACK within `timeout` s means the peer is gone: close, which ends its
streams). RFC 9113 error codes the engines send live here too.

Keepalive and the server's connection timeouts run on one `ConnectionClock` per event
loop, not on a timer and a task per connection: at 1,000 kubelets those woke the loop
~180 times a second, each wake-up a full loop pass for one connection; the clock checks
each connection once a second, an eighth of them at a time (bench/README.md, "A
cluster-shaped day")."""

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
CLOCK_TICK = 2.0  # s: how often each connection's keepalive and timeouts are checked
# (more often when its own settings need it: a quarter of its shortest interval, the
# defaults' being the 15 s PING timeout). Each tick costs ~1k instructions per
# connection: at 1 s that was ~2% of the steady state at 1,000 kubelets
CLOCK_SLICES = 8  # each firing checks an eighth of the connections: 20,000 connections
# cost eight small pauses a second, not one long one
CLOCK_MIN_TICK = 0.01  # s: however small a configured interval, the clock never spins


class ConnectionClock:
    """One timer for every HTTP/2 connection on an event loop: about once a `tick`
    each connection's `_on_tick(now)` runs (keepalive PINGs, idle and stalled-writer
    timeouts), a slice of them at each firing."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._members: dict[H2Transport, int] = {}  # -> its slice
        # the members of each slice, kept apart: a firing copies only its own slice, not
        # every connection (at 1,000 connections the whole copy cost 8 a second)
        self._slices: list[dict[H2Transport, None]] = [{} for _ in range(CLOCK_SLICES)]
        self._joined = 0  # members are dealt to the slices in turn
        self._handle: asyncio.TimerHandle | None = None
        self._slice = 0
        self.tick = CLOCK_TICK

    def join(self, member: H2Transport, tick: float) -> None:
        if member not in self._members:
            part = self._joined % CLOCK_SLICES
            self._joined += 1
            self._members[member] = part
            self._slices[part][member] = None
        tick = max(tick, CLOCK_MIN_TICK)
        if tick < self.tick:  # kept until the clock empties: only tests set such ticks
            self.tick = tick
            if self._handle is not None:
                self._handle.cancel()
                self._handle = None
        if self._handle is None:
            self._handle = self._loop.call_later(self.tick / CLOCK_SLICES, self._fire)

    def leave(self, member: H2Transport) -> None:
        part = self._members.pop(member, None)
        if part is not None:
            del self._slices[part][member]
        if not self._members:
            if self._handle is not None:
                self._handle.cancel()
                self._handle = None
            _CLOCKS.pop(self._loop, None)

    def _fire(self) -> None:
        self._handle = None
        now = time.monotonic()
        part = self._slice
        self._slice = (part + 1) % CLOCK_SLICES
        for member in list(self._slices[part]):
            try:
                member._on_tick(now)
            except Exception:  # one connection's bug must not stop every clock
                log.exception("connection clock: %s", member._peer_name())
        if self._members:
            self._handle = self._loop.call_later(self.tick / CLOCK_SLICES, self._fire)


_CLOCKS: dict[asyncio.AbstractEventLoop, ConnectionClock] = {}


def _flush(conn: H2Transport) -> None:
    """The loop callback of a scheduled flush (`H2Transport._write_out`)."""
    conn._flush_now()


def clock_of(loop: asyncio.AbstractEventLoop) -> ConnectionClock:
    clock = _CLOCKS.get(loop)
    if clock is None:
        clock = _CLOCKS[loop] = ConnectionClock(loop)
    return clock


@mypyc_attr(allow_interpreted_subclasses=True)  # the h2 / HTTP/1.1 engines extend it
class H2Transport(asyncio.Protocol):
    _loop: asyncio.AbstractEventLoop  # set in connection_made (get_running_loop() costs a
    # getpid() system call in CPython 3.11, and _write_out runs several times a request)

    def __init__(self) -> None:
        # set here, not as class-level defaults: see ServerStream.__init__
        self.transport: asyncio.Transport | None = None
        self._flush_handle: asyncio.Handle | None = None
        self._clock: ConnectionClock | None = None
        self._ping_interval = 0.0  # 0: no keepalive
        self._ping_timeout = 0.0
        self._ping_sent_at = -1.0  # when our unanswered keepalive PING left (-1: none)
        self._last_read = 0.0

    def _send_ping(self, payload: bytes) -> None:
        raise NotImplementedError

    def _data_to_send(self) -> bytes:
        raise NotImplementedError

    def _data_sent(self) -> None:
        """After a flush wrote what `_data_to_send` framed: an engine acts on what the
        framing itself caused (nghttp2: streams that closed as their last frame went
        out, producers whose data left). Only now, so that whatever that does (answer,
        reset, close the connection) comes after those bytes on the wire."""

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
            # a function and its argument: `self._flush_now` would make a bound method
            # at every scheduled flush (several a request)
            self._flush_handle = self._loop.call_soon(_flush, self)

    def _flush_now(self) -> None:
        self._flush_handle = None
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        data = self._data_to_send()
        if data:
            transport.write(data)
        self._data_sent()

    # -- keepalive and the connection clock -----------------------------------------------
    def _start_clock(self, interval: float, timeout: float, tick: float = CLOCK_TICK) -> None:
        """Join the loop's clock (at connection_made): PING after `interval` s of
        silence (0: never); `_on_tick` runs at least every `tick` s (CLOCK_TICK at most)
        for a subclass's own checks."""
        self._ping_interval = interval
        self._ping_timeout = timeout
        if interval > 0:
            tick = min(tick, interval / 4, timeout / 4)
        self._clock = clock_of(self._loop)
        self._clock.join(self, tick)

    def _stop_transport_timers(self) -> None:
        if self._clock is not None:
            self._clock.leave(self)
            self._clock = None
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None

    def _keepalive_acked(self) -> None:
        self._ping_sent_at = -1.0

    def _on_tick(self, now: float) -> None:
        """The clock's tick: a keepalive PING when the peer has been silent for the
        interval; close when the PING went unanswered for the timeout."""
        self._keepalive_tick(now)

    def _keepalive_tick(self, now: float) -> bool:
        """`_on_tick`'s keepalive; False when the connection is closing (or closed by
        it), so a subclass's own checks need not ask the transport again."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return False
        interval = self._ping_interval
        if interval <= 0:
            return True
        if self._ping_sent_at < 0:
            if now - self._last_read >= interval:
                self._ping_sent_at = now
                self._send_ping(KEEPALIVE_PING)
                self._write_out()
        elif now - self._ping_sent_at >= self._ping_timeout:
            peer = self._peer_name()
            log.warning("%s did not answer PING within %ss: closing", peer, self._ping_timeout)
            self._ping_sent_at = -1.0
            self.close()
            return False
        return True
