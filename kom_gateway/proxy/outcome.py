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
from kom_gateway.routing.router import Decision

ANSWERED_BY_GATEWAY = "gateway"  # the access log's answeredBy when no group answered


class Outcome:
    """One request, as it ended."""

    __slots__ = (
        "answered_by",
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


class OutcomeRecorder:
    def __init__(self, metrics: Metrics, access_log: AccessLog) -> None:
        self.metrics = metrics
        self.access_log = access_log
        self._requests: dict[tuple[str, str, str, str, int], Any] = {}
        self._durations: dict[tuple[str, str], Any] = {}

    def record(self, outcome: Outcome, metric_group: str | None = None) -> None:
        """Count `outcome` under `metric_group` (default: the group that answered) and
        log it if sampled."""
        info = outcome.info
        group = metric_group or outcome.answered_by
        key = (group, info.verb, info.resource, info.subresource, outcome.status)
        counter = self._requests.get(key)
        if counter is None:
            counter = self._requests[key] = self.metrics.requests.labels(
                group, info.verb, info.resource, info.subresource, str(outcome.status)
            )
        self.metrics.count(counter)
        if not info.is_long_running:
            dkey = (group, info.verb)
            histogram = self._durations.get(dkey)
            if histogram is None:
                histogram = self._durations[dkey] = self.metrics.duration.labels(*dkey)
            histogram.observe(outcome.duration)
        if self.access_log.wants(outcome.status, outcome.fallback):
            self.access_log.write(access_record(time.time() - outcome.duration, outcome))
