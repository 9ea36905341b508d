"""How a request went, recorded in one place: the request counter, the latency histogram
and the access-log line all come from one `Outcome`, whichever path answered (the
exchange, the gateway's own 400/429, an Upgrade)."""

from __future__ import annotations

import time
from typing import Protocol

from kom_gateway.kube.requestinfo import RequestInfo
from kom_gateway.proxy.accesslog import AccessLog, access_record
from kom_gateway.proxy.metrics import Metrics, Series
from kom_gateway.routing.cutover import Client
from kom_gateway.routing.router import REASON_CUT_OVER, Decision

ANSWERED_BY_GATEWAY = "gateway"  # the access log's answeredBy when no group answered
_CODE_CLASS = {1: "1xx", 2: "2xx", 3: "3xx", 4: "4xx", 5: "5xx"}
SERIES_CACHE_SIZE = 4096  # kinds of outcome kept (cleared when full)
# The resource (and subresource) label of a request for one no apiserver has answered with
# success yet: the path is the client's, so a label per name would let any client mint
# series without end (kube-apiserver drops such labels for the same reason).
UNVERIFIED = "(unverified)"
MAX_VERIFIED = 10_000  # resources and subresources with a label of their own, at most


def moved_outcome(outcome: Finished, group: str) -> str:
    """How a request a cut-over rule moved to `group` ended, as the rollout guards
    count it (the `outcome` label of kom_gateway_cutover_outcomes_total)."""
    if outcome.fallback is not None:
        return "fallback"
    if outcome.answered_by != group:
        return "gateway"
    if outcome.broken:
        return "broken"
    return _CODE_CLASS.get(outcome.status // 100, "5xx")


class Finished(Protocol):
    """What is recorded of a request that ended: an `Outcome`, or the proxy's `Exchange`
    itself, which keeps these attributes (so a proxied request builds no second object)."""

    client: Client
    info: RequestInfo
    answered_by: str  # the group that answered, or ANSWERED_BY_GATEWAY
    status: int  # 499: the client went away first
    duration: float
    endpoint: str
    bytes_in: int
    bytes_out: int
    fallback: str | None  # why the request last left a group, if it did
    broken: bool  # the group failed after the response had started

    @property  # read-only: an Exchange always has a Decision, an Outcome may not
    def decision(self) -> Decision | None: ...


class Outcome:
    """One request, as it ended (for the requests the gateway answers itself, and
    Upgrades)."""

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
        self.answered_by = answered_by
        self.status = status
        self.duration = duration
        self.endpoint = endpoint
        self.bytes_in = bytes_in
        self.bytes_out = bytes_out
        self.fallback = fallback
        self.broken = broken


class OutcomeRecorder:
    """Every kind of outcome (group, request kind, status, and for a moved request its
    rule and how it ended) adds to the same few metric children: their tallies are
    looked up once per kind and kept (`_series`), so recording is one dict lookup and
    one call."""

    def __init__(self, metrics: Metrics, access_log: AccessLog) -> None:
        self.metrics = metrics
        self.access_log = access_log
        self._series: dict[tuple, Series] = {}
        # "pods", "pods/exec": answered by an apiserver with a status below 400, so they
        # exist; a path's segment earns its own label only then (bounded: MAX_VERIFIED)
        self._verified: set[str] = set()

    def record(self, outcome: Finished, metric_group: str | None = None) -> None:
        """Count `outcome` under `metric_group` (default: the group that answered) and
        log it if sampled."""
        info = outcome.info
        group = metric_group or outcome.answered_by
        decision = outcome.decision
        # keyed by the int status: no str() per request
        key: tuple = (group, info.verb, info.resource, info.subresource, info.is_long_running,
                      outcome.status)  # fmt: skip
        if decision is not None and decision.reason == REASON_CUT_OVER:
            rule = decision.rule
            key += (rule.label if rule is not None else "none", decision.target,
                    moved_outcome(outcome, decision.target))  # fmt: skip
        series = self._series.get(key)
        if series is None:
            series = self._new_series(key, outcome.answered_by)
        series.add(outcome.duration)
        if self.access_log.wants(outcome.status, outcome.fallback):
            self.access_log.write(access_record(time.time() - outcome.duration, outcome))

    def _new_series(self, key: tuple, answered_by: str) -> Series:
        """The counters and histograms one kind of outcome adds to: the request counter
        and duration (not for long-running requests), and for requests a cut-over rule
        moved, the per-rule counter and duration the rollout guards read."""
        group, verb, resource, subresource, long_running, status = key[:6]
        if status < 400 and answered_by != ANSWERED_BY_GATEWAY:
            self._verify(resource, subresource)
        m = self.metrics
        counters = [m.child(m.requests, group, verb, *self._labels(resource, subresource),
                            str(status))]  # fmt: skip
        histograms = [] if long_running else [m.child(m.duration, group, verb)]
        if len(key) > 6:
            label, target, kind = key[6:]
            counters.append(m.child(m.cutover_outcomes, label, target, kind))
            if kind != "fallback" and kind != "gateway" and not long_running:
                histograms.append(m.child(m.cutover_duration, label, target))
        if len(self._series) >= SERIES_CACHE_SIZE:
            self._series.clear()  # (made-up resources cost their senders misses here)
        series = self._series[key] = m.series(tuple(counters), tuple(histograms))
        return series

    def _labels(self, resource: str, subresource: str) -> tuple[str, str]:
        """The resource and subresource labels: as requested once verified, else
        UNVERIFIED (a non-resource request has neither)."""
        verified = self._verified
        if resource and resource not in verified:
            return UNVERIFIED, UNVERIFIED if subresource else ""
        if subresource and f"{resource}/{subresource}" not in verified:
            return resource, UNVERIFIED
        return resource, subresource

    def _verify(self, resource: str, subresource: str) -> None:
        """An apiserver answered a request for `resource` (and `subresource`) with
        success: both exist, and their requests are counted under their names from now
        on (the kinds of outcome cached under UNVERIFIED are looked up again)."""
        if not resource:  # a non-resource request: nothing to verify
            return
        names = {resource, f"{resource}/{subresource}"} if subresource else {resource}
        new = names - self._verified
        if new and len(self._verified) + len(new) <= MAX_VERIFIED:
            self._verified |= new
            self._series.clear()
