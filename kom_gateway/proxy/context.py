"""What carrying a request needs from the gateway, and nothing more (the exchange gets
this, not the `Gateway`)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from kom_gateway.overload.clientshare import ClientBuffers
from kom_gateway.proxy.metrics import Metrics
from kom_gateway.proxy.outcome import OutcomeRecorder
from kom_gateway.proxy.upstreams import Upstreams
from kom_gateway.shadow.reads import ShadowReads

if TYPE_CHECKING:
    from kom_gateway.proxy.exchange import Exchange


@dataclass(slots=True)
class ProxyContext:
    upstreams: Upstreams
    metrics: Metrics
    recorder: OutcomeRecorder
    buffers: ClientBuffers  # response bytes held per client (fair share)
    shadows: ShadowReads  # reads also asked of a candidate group, and compared
    # exchanges in progress: requests with a timeout, and long-running ones (watches...)
    live: dict[Exchange, None] = field(default_factory=dict)
    long_running: dict[Exchange, None] = field(default_factory=dict)
    upgrades: set[asyncio.Task[None]] = field(default_factory=set)  # exec, attach, ... sessions

    def expire(self, now: float) -> None:
        """Answer every request whose timeout has passed by `now`. A scan of the requests
        in flight (bounded by the groups' in-flight limits) a few times a second costs
        less than a timer per request (uvloop: ~4 µs to arm and cancel one)."""
        for exchange in [e for e in self.live if e.deadline <= now]:
            exchange.timed_out()

    def exchanges(self) -> list[Exchange]:
        return [*self.live, *self.long_running]
