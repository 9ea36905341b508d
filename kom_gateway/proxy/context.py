"""What carrying a request needs from the gateway, and nothing more (the exchange gets
this, not the `Gateway`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from kom_gateway.proxy.deadlines import Deadlines
from kom_gateway.proxy.metrics import Metrics
from kom_gateway.proxy.outcome import OutcomeRecorder
from kom_gateway.proxy.upstreams import Upstreams

if TYPE_CHECKING:
    from kom_gateway.proxy.exchange import Exchange


@dataclass(slots=True)
class ProxyContext:
    upstreams: Upstreams
    metrics: Metrics
    recorder: OutcomeRecorder
    deadlines: Deadlines[Exchange] = field(default_factory=Deadlines)
    live: dict[Exchange, None] = field(default_factory=dict)  # exchanges in progress

    def expire(self, now: float) -> None:
        """Answer every exchange whose request timeout has passed by `now`."""
        for exchange in self.deadlines.expired(now):
            exchange.timed_out()
