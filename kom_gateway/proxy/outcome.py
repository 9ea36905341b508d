"""How a request went, recorded in one place: the request counter, the latency histogram
and the access-log line all come from one `Outcome`, whichever path answered (the
exchange, the gateway's own 400/429, an Upgrade)."""

from __future__ import annotations

import time
from typing import Any

from kom_gateway.proxy.accesslog import AccessLog, access_record
from kom_gateway.proxy.metrics import Metrics
from kom_gateway.requestinfo import RequestInfo
from kom_gateway.routing.cutover import Client
from kom_gateway.routing.router import REASON_CUT_OVER, Decision

ANSWERED_BY_GATEWAY = "gateway"  # the access log's answeredBy when no group answered
_CODE_CLASS = {1: "1xx", 2: "2xx", 3: "3xx", 4: "4xx", 5: "5xx"}


def moved_outcome(outcome: Outcome, group: str) -> str:
    """How a request a cut-over rule moved to `group` ended, as the rollout guards
    count it (the `outcome` label of kom_gateway_cutover_outcomes_total)."""
    if outcome.fallback is not None:
        return "fallback"
    if outcome.answered_by != group:
        return "gateway"
    if outcome.broken:
        return "broken"
    return _CODE_CLASS.get(outcome.status // 100, "5xx")


class Outcome:
    """One request, as it ended."""

    __slots__ = (
        "answered_by",
        "broken",
        "bytes_in",
        "bytes_out",
        "client",
        "decision",
        "duration",
        "endpoint",
        "fallback",
        "info",
        "status",
    )

    def __init__(
        self,
        client: Client,
        info: RequestInfo,
        decision: Decision | None,
        answered_by: str,
        status: int,
        duration: float = 0.0,
        endpoint: str = "",
        bytes_in: int = 0,
        bytes_out: int = 0,
        fallback: str | None = None,
        broken: bool = False,
    ) -> None:
        self.client = client
        self.info = info
        self.decision = decision
        self.answered_by = answered_by  # the group that answered, or ANSWERED_BY_GATEWAY
        self.status = status  # 499: the client went away first
        self.duration = duration
        self.endpoint = endpoint
        self.bytes_in = bytes_in
        self.bytes_out = bytes_out
        self.fallback = fallback  # why the request last left a group, if it did
        self.broken = broken  # the group failed after the response had started


class OutcomeRecorder:
    def __init__(self, metrics: Metrics, access_log: AccessLog) -> None:
        self.metrics = metrics
        self.access_log = access_log
        self._requests: dict[tuple[str, str, str, str, int], Any] = {}

    def record(self, outcome: Outcome, metric_group: str | None = None) -> None:
        """Count `outcome` under `metric_group` (default: the group that answered) and
        log it if sampled."""
        info = outcome.info
        metrics = self.metrics
        group = metric_group or outcome.answered_by
        key = (group, info.verb, info.resource, info.subresource, outcome.status)
        counter = self._requests.get(key)  # keyed by the int status: no str() per request
        if counter is None:
            counter = self._requests[key] = metrics.requests.labels(
                group, info.verb, info.resource, info.subresource, str(outcome.status)
            )
        metrics.count(counter)
        if not info.is_long_running:
            histogram = metrics.child(metrics.duration, group, info.verb)
            metrics.observe(histogram, outcome.duration)
        decision = outcome.decision
        if decision is not None and decision.reason == REASON_CUT_OVER:
            self._record_moved(outcome, decision)
        if self.access_log.wants(outcome.status, outcome.fallback):
            self.access_log.write(access_record(time.time() - outcome.duration, outcome))

    def _record_moved(self, outcome: Outcome, decision: Decision) -> None:
        """Per rule and group, for the rollout guards: only requests a rule moved."""
        label = decision.rule.label if decision.rule is not None else "none"
        group = decision.target
        kind = moved_outcome(outcome, group)
        metrics = self.metrics
        metrics.count(metrics.child(metrics.cutover_outcomes, label, group, kind))
        if kind != "fallback" and kind != "gateway" and not outcome.info.is_long_running:
            histogram = metrics.child(metrics.cutover_duration, label, group)
            metrics.observe(histogram, outcome.duration)
