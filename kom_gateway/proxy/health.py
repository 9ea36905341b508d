"""Whether an apiserver endpoint takes requests (pure; time passed in).

Two judges, as Envoy has them:
- **probes** (active): `GET /readyz` every interval; `failure_threshold` failed probes in
  a row take the endpoint out, one passing probe brings it back. A refused connection
  takes it out at once (and asks for a probe right away).
- **outlier ejection** (passive): `consecutive_failures` failed requests in a row (5xx,
  reset, a response broken after its headers, timeout) eject it for `base_ejection` x
  its ejection count, at most `max_ejection`; it comes back by itself when that time is
  up. The count is forgotten after the endpoint has gone `max_ejection` without an
  ejection.

A response that completes (a watch: its first whole event) resets the run of failures:
a group that answers most requests well is not ejected for a few bad ones. A response
counts only once it is whole, or a group that resets every stream after its headers
would look healthy between its failures.
"""

from __future__ import annotations

from kom_gateway.config.model import Health

# why an endpoint was taken out (label of kom_gateway_upstream_ejections_total)
EJECT_FAILURES = "consecutive-failures"
EJECT_PROBE = "probe"
EJECT_CONNECT = "connect-error"


class EndpointHealth:
    __slots__ = (
        "consecutive_failures",
        "ejected_until",
        "ejections",
        "last_ejection",
        "policy",
        "probe_down",
        "probe_failures",
    )

    def __init__(self, policy: Health) -> None:
        self.policy = policy
        self.consecutive_failures = 0  # requests, since the last success
        self.probe_failures = 0  # probes, since the last passing one
        self.probe_down = False
        self.ejections = 0
        self.ejected_until = 0.0
        self.last_ejection = float("-inf")

    def available(self, now: float) -> bool:
        return not self.probe_down and now >= self.ejected_until

    # -- passive ---------------------------------------------------------------------------
    def success(self) -> None:
        self.consecutive_failures = 0

    def failure(self, now: float, may_eject: bool) -> bool:
        """A request failed. True if this ejects the endpoint (only when `may_eject`:
        the caller knows whether the group keeps another endpoint)."""
        self.consecutive_failures += 1
        if self.consecutive_failures < self.policy.consecutive_failures or not may_eject:
            return False
        if now < self.ejected_until:
            return False  # already out (failures of requests sent before the ejection)
        policy = self.policy
        if now - self.last_ejection > policy.max_ejection + policy.base_ejection:
            self.ejections = 0  # a long good run: start the backoff over
        self.ejections += 1
        self.last_ejection = now
        self.ejected_until = now + min(policy.base_ejection * self.ejections, policy.max_ejection)
        self.consecutive_failures = 0
        return True

    def wants_probe(self) -> bool:
        """Ejection was due but refused (the group's last endpoint): let a probe decide."""
        return self.consecutive_failures >= self.policy.consecutive_failures

    # -- active ----------------------------------------------------------------------------
    def probe_result(self, ok: bool) -> bool | None:
        """Record a probe; True if it brought the endpoint back, False if it took it out,
        None if that did not change."""
        if ok:
            self.probe_failures = 0
            if self.probe_down:
                self.probe_down = False
                self.consecutive_failures = 0  # back: let requests show it again
                return True
            # (a passing probe does not clear a run of failed requests: /readyz can pass
            # while every request breaks, and that run must still reach the threshold)
            return None
        self.probe_failures += 1
        if not self.probe_down and (
            self.probe_failures >= self.policy.failure_threshold or self.wants_probe()
        ):
            self.probe_down = True
            return False
        return None

    def connect_failed(self) -> bool:
        """A connection was refused: out at once, until a probe passes. True if that
        took it out now."""
        if self.probe_down:
            return False
        self.probe_down = True
        return True
