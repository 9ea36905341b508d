"""HTTP/2 abuse detection for client connections (pure: no I/O, time passed in).

Each kind of cheap-to-send, costly-to-serve frame gets a token bucket per connection:
a client may burst, then must stay under a steady rate. Whoever empties one is told to
calm down (GOAWAY ENHANCE_YOUR_CALM) and disconnected; the kind is counted.

- rapid reset (CVE-2023-44487): every stream the client opens and resets costs us a
  routing decision and an upstream stream. Legitimate clients reset rarely (an informer
  restarting its watches, kubectl interrupted).
- PING and SETTINGS floods: each one makes us write an ACK.
- control-frame floods: WINDOW_UPDATE and PRIORITY frames, and empty DATA frames.
CONTINUATION floods are bounded by h2 itself (64 frames a header block, then a protocol
error), and the header list by SETTINGS_MAX_HEADER_LIST_SIZE; the protocol shell counts
both when they end a connection.
"""

from __future__ import annotations

from dataclasses import dataclass

from kom_gateway.tokenbucket import TokenBucket

RAPID_RESET = "rapid-reset"
PING_FLOOD = "ping-flood"
SETTINGS_FLOOD = "settings-flood"
CONTROL_FLOOD = "control-frame-flood"
EMPTY_FRAMES = "empty-frame-flood"
CONTINUATION_FLOOD = "continuation-flood"
PROTOCOL_ERROR = "protocol-error"
STALLED_READER = "stalled-reader"
WRITE_BACKLOG = "write-backlog"


@dataclass(frozen=True)
class GuardLimits:
    """(burst, per-second rate) per kind. Defaults leave well-behaved clients (client-go
    pings every 30 s; kubectl, informers) orders of magnitude below them."""

    resets: tuple[float, float] = (400, 100)
    pings: tuple[float, float] = (50, 5)
    settings: tuple[float, float] = (50, 5)
    control: tuple[float, float] = (20000, 5000)
    empty_frames: tuple[float, float] = (1000, 100)


# For servers that must not cut anyone off for frame rates: kube-apiserver (Go) has no
# such budgets, and the simulator models it. Finite, so the bucket arithmetic stays real.
UNGUARDED = GuardLimits(*((1e12, 1e12),) * 5)


class H2Guard:
    """One client connection's budgets. Each `on_*` returns the abuse kind when the
    client just went over its budget, else None."""

    __slots__ = ("_control", "_empty", "_pings", "_resets", "_settings")

    def __init__(self, limits: GuardLimits, now: float) -> None:
        self._resets = _bucket(limits.resets, now)
        self._pings = _bucket(limits.pings, now)
        self._settings = _bucket(limits.settings, now)
        self._control = _bucket(limits.control, now)
        self._empty = _bucket(limits.empty_frames, now)

    def on_reset(self, now: float) -> str | None:
        return RAPID_RESET if self._resets.take(now) else None

    def on_ping(self, now: float) -> str | None:
        return PING_FLOOD if self._pings.take(now) else None

    def on_settings(self, now: float) -> str | None:
        return SETTINGS_FLOOD if self._settings.take(now) else None

    def on_control(self, now: float) -> str | None:
        return CONTROL_FLOOD if self._control.take(now) else None

    def on_empty_data(self, now: float) -> str | None:
        return EMPTY_FRAMES if self._empty.take(now) else None


def _bucket(budget: tuple[float, float], now: float) -> TokenBucket:
    burst, rate = budget
    return TokenBucket(rate, burst, now)


def protocol_error_kind(message: str) -> str:
    """What an h2 ProtocolError that ended a connection says about the client."""
    return CONTINUATION_FLOOD if "continuation" in message.lower() else PROTOCOL_ERROR
