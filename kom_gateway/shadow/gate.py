"""Whether one more read may be shadowed now (pure, time passed in).

A shadow read is extra work for the candidate group and for this process, so it is the
first thing given up: never past the rule's `maxPerSecond`, never while the candidate
has no endpoint taking requests, never while this replica is near its capacity, and
never more at once than one second's budget (a slow candidate cannot pile them up).
"""

from __future__ import annotations

from kom_gateway.routing.cutover import ShadowSpec
from kom_gateway.tokenbucket import TokenBucket

SHED_LOAD = 0.9  # this replica's load (kom_gateway_load) from which nothing is shadowed

# why a sampled read was not shadowed (the `reason` of a skip)
SKIP_LOAD = "load"
SKIP_EJECTED = "ejected"
SKIP_IN_FLIGHT = "in-flight"
SKIP_BUDGET = "budget"


class ShadowGate:
    """One rule's shadow budget; kept across reloads that keep its `shadow` as it is."""

    __slots__ = ("bucket", "in_flight", "max_in_flight", "spec")

    def __init__(self, spec: ShadowSpec, now: float) -> None:
        self.spec = spec
        rate = spec.max_per_second
        self.bucket = TokenBucket(rate, max(1.0, rate), now)
        self.max_in_flight = max(1, int(rate))
        self.in_flight = 0

    def sampled(self, draw: float) -> bool:
        """`draw` uniform in [0, 1): is this read in the rule's sample?"""
        return draw * 100.0 < self.spec.percent

    def admit(self, now: float, load: float, candidate_up: bool) -> str:
        """ "" when a sampled read is shadowed (it then holds a place until `release`),
        else why not."""
        if load >= SHED_LOAD:
            return SKIP_LOAD
        if not candidate_up:
            return SKIP_EJECTED
        if self.in_flight >= self.max_in_flight:
            return SKIP_IN_FLIGHT
        if self.bucket.take(now) > 0.0:
            return SKIP_BUDGET
        self.in_flight += 1
        return ""

    def release(self) -> None:
        self.in_flight -= 1
