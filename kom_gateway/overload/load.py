"""The gateway's own load, and what it does to GOAWAY.

Load is one figure, 1.0 meaning "at capacity": the largest of the fullest group's share
of its in-flight limit, event-loop lag against a budget, and open HTTP/2 streams against
a budget. Below `soft_load` every HTTP/2 request triggers a graceful GOAWAY with the
small base chance (kube-apiserver's --goaway-chance); above it the chance rises linearly
to `max_chance` at full load, so the busiest replica sheds connections fastest. The
connection itself sends at most one GOAWAY.
"""

from __future__ import annotations

from dataclasses import dataclass

from kom_gateway.http.settings import H2ServerSettings


@dataclass(frozen=True)
class GoawayPolicy:
    chance: float = 0.0  # per HTTP/2 request below soft_load (kube-apiserver: off; 0.001)
    max_chance: float = 0.02  # at full load (kube-apiserver caps --goaway-chance at 0.02)
    soft_load: float = 0.7
    # seconds; 0: connections live as long as clients like (the HTTP layer's defaults)
    max_connection_age: float = H2ServerSettings.max_connection_age
    max_connection_age_jitter: float = H2ServerSettings.max_connection_age_jitter
    lag_budget: float = 0.1  # event-loop lag (s) that counts as full load
    stream_budget: int = 0  # open HTTP/2 streams that count as full load (0: not counted)


def goaway_chance(load: float, policy: GoawayPolicy) -> float:
    if load <= policy.soft_load:
        return policy.chance
    rise = min(1.0, (load - policy.soft_load) / (1.0 - policy.soft_load))
    return policy.chance + (max(policy.max_chance, policy.chance) - policy.chance) * rise


class LoadMeter:
    """Event-loop lag, smoothed (exponential moving average over ~`window` seconds),
    combined with the other signals on demand."""

    __slots__ = ("lag", "window")

    def __init__(self, window: float = 2.0) -> None:
        self.window = window
        self.lag = 0.0

    def observe_lag(self, lag: float, interval: float) -> None:
        """A timer due `interval` seconds after the last one fired `lag` seconds late."""
        weight = min(1.0, (interval + lag) / self.window)
        self.lag += (max(0.0, lag) - self.lag) * weight

    def load(self, inflight_share: float, open_streams: int, policy: GoawayPolicy) -> float:
        load = inflight_share
        if policy.lag_budget > 0:
            load = max(load, self.lag / policy.lag_budget)
        if policy.stream_budget > 0:
            load = max(load, open_streams / policy.stream_budget)
        return load
