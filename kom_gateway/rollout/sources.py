"""Where guard readings come from (I/O): every gateway replica's admin /metrics, scraped
and summed here, or a Prometheus that already scrapes them all, asked in PromQL."""

from __future__ import annotations

import json
import math
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

from prometheus_client.parser import text_string_to_metric_families

from kom_gateway.rollout.guards import (
    Readings,
    ReplicaSample,
    Sample,
    SampleWindow,
    ShadowReadings,
    quantile,
    readings_from,
)

OUTCOMES = "kom_gateway_cutover_outcomes_total"
BUCKETS = "kom_gateway_cutover_request_duration_seconds_bucket"
PERCENT = "kom_gateway_cutover_percent"
GENERATION = "kom_gateway_config_generation"
SHADOW_RESULTS = "kom_gateway_shadow_requests_total"
SHADOW_BUCKETS = "kom_gateway_shadow_duration_seconds_bucket"
SHADOW_PERCENT = "kom_gateway_shadow_percent"


class Source(Protocol):
    def observe(self, now: float) -> list[str]:
        """Take a reading; problems (an unreachable replica) in words."""
        ...

    def clear(self) -> None:
        """Forget readings taken before now (a new percent is being served)."""
        ...

    def readings(self, since: float, now: float) -> Readings | None: ...

    def served(self) -> list[float | None]:
        """The percent each replica serves for the rule and group (None: unknown)."""
        ...

    def shadow_readings(self, since: float, now: float) -> ShadowReadings | None: ...

    def shadow_served(self) -> list[float | None]:
        """The shadow percent each replica serves for the rule and group."""
        ...


def replica_sample(text: str, rule: str, group: str) -> ReplicaSample:
    """One replica's /metrics page -> its counters for (rule, group)."""
    outcomes: dict[str, float] = {}
    buckets: dict[float, float] = {}
    shadow: dict[str, float] = {}
    shadow_buckets: dict[float, float] = {}
    percent = 0.0  # a rule without this group moves nobody to it
    shadow_percent = 0.0
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = s.labels
            if labels.get("group") != group:
                continue
            if s.name == SHADOW_BUCKETS:  # (by group only: the candidate's latency)
                le = float(labels["le"])
                shadow_buckets[le] = shadow_buckets.get(le, 0.0) + s.value
            if labels.get("rule") != rule:
                continue
            if s.name == OUTCOMES:
                outcomes[labels["outcome"]] = outcomes.get(labels["outcome"], 0.0) + s.value
            elif s.name == BUCKETS:
                le = float(labels["le"])
                buckets[le] = buckets.get(le, 0.0) + s.value
            elif s.name == PERCENT:
                percent = s.value
            elif s.name == SHADOW_RESULTS:
                shadow[labels["result"]] = shadow.get(labels["result"], 0.0) + s.value
            elif s.name == SHADOW_PERCENT:
                shadow_percent = s.value
    return ReplicaSample(outcomes, buckets, percent, shadow, shadow_buckets, shadow_percent)


class GatewaysSource:
    def __init__(
        self, urls: Sequence[str], rule: str, group: str, window: float, timeout: float
    ) -> None:
        self.urls = tuple(urls)
        self.rule = rule
        self.group = group
        self.window_seconds = window
        self.timeout = timeout
        self.window = SampleWindow()
        self._last: Sample | None = None
        self._pool = ThreadPoolExecutor(max_workers=min(16, len(self.urls)))

    def _scrape(self, url: str) -> ReplicaSample | str:
        try:
            with urllib.request.urlopen(f"{url}/metrics", timeout=self.timeout) as r:
                text = r.read().decode("utf-8", "replace")
        except (OSError, ValueError) as exc:
            return f"{url}: {getattr(exc, 'reason', exc)}"
        try:
            return replica_sample(text, self.rule, self.group)
        except ValueError as exc:
            return f"{url}: unreadable metrics ({exc})"

    def observe(self, now: float) -> list[str]:
        results = list(self._pool.map(self._scrape, self.urls))
        replicas = {
            u: r for u, r in zip(self.urls, results, strict=True) if isinstance(r, ReplicaSample)
        }
        problems = [r for r in results if isinstance(r, str)]
        self._last = Sample(now, replicas, tuple(problems))
        self.window.add(self._last, self.window_seconds)
        return problems

    def clear(self) -> None:
        self.window.clear()

    def readings(self, since: float, now: float) -> Readings | None:
        if self._last is None or self._last.unreachable:
            return None  # a replica we cannot see might be the one failing
        return self.window.readings()

    def served(self) -> list[float | None]:
        return self._each(lambda r: r.percent)

    def shadow_readings(self, since: float, now: float) -> ShadowReadings | None:
        if self._last is None or self._last.unreachable:
            return None
        return self.window.shadow_readings()

    def shadow_served(self) -> list[float | None]:
        return self._each(lambda r: r.shadow_percent)

    def _each(self, value: Callable[[ReplicaSample], float | None]) -> list[float | None]:
        last = self._last
        if last is None:
            return [None] * len(self.urls)
        return [value(last.replicas[u]) if u in last.replicas else None for u in self.urls]


def promql_string(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


class PrometheusSource:
    """Increases over the window as Prometheus computes them (`increase()` over every
    replica it scrapes)."""

    def __init__(
        self, url: str, rule: str, group: str, window: float, timeout: float, min_range: float
    ) -> None:
        self.url = url
        self.selector = f"rule={promql_string(rule)},group={promql_string(group)}"
        self.window_seconds = window
        self.timeout = timeout
        self.min_range = min_range  # shorter ranges hold too few scrapes to say anything
        self._served: list[float | None] = []
        self._shadow_served: list[float | None] = []
        self.group_selector = f"group={promql_string(group)}"

    def query(self, expr: str) -> list[dict]:
        url = f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        with urllib.request.urlopen(url, timeout=self.timeout) as r:
            body = json.loads(r.read())
        if body.get("status") != "success":
            raise ValueError(body.get("error", "query failed"))
        return body["data"]["result"]

    def observe(self, now: float) -> list[str]:
        try:
            instances = self.query(f"max by (instance) ({GENERATION})")
            percents = self.query(f"max by (instance) ({PERCENT}{{{self.selector}}})")
            shadows = self.query(f"max by (instance) ({SHADOW_PERCENT}{{{self.selector}}})")
        except (OSError, ValueError) as exc:
            self._served = self._shadow_served = []
            return [f"{self.url}: {getattr(exc, 'reason', exc)}"]
        self._served = _per_instance(instances, percents)
        self._shadow_served = _per_instance(instances, shadows)
        return []

    def clear(self) -> None:
        pass  # ranges start at `since`

    def _increases(
        self, counter: str, by: str, buckets: str, bucket_selector: str, since: float, now: float
    ) -> tuple[float, dict[str, float], dict[float, float], int] | None:
        """Over the window (or since `since`): `counter`'s increase summed by label `by`,
        the histogram `buckets`' increase by bound, and how many replicas Prometheus sees;
        None when the span is too short or Prometheus does not answer."""
        span = min(self.window_seconds, now - since)
        if span < self.min_range:
            return None
        rng = f"[{max(1, int(span))}s]"
        try:
            counts = self.query(f"sum by ({by}) (increase({counter}{{{self.selector}}}{rng}))")
            bounds = self.query(f"sum by (le) (increase({buckets}{{{bucket_selector}}}{rng}))")
            replicas = self.query(f"count(count by (instance) ({GENERATION}))")
        except (OSError, ValueError):
            return None
        return (
            span,
            {r["metric"][by]: _value(r) for r in counts},
            {float(r["metric"]["le"]): _value(r) for r in bounds},
            int(_value(replicas[0])) if replicas else 0,
        )

    def readings(self, since: float, now: float) -> Readings | None:
        found = self._increases(OUTCOMES, "outcome", BUCKETS, self.selector, since, now)
        return None if found is None else readings_from(*found)

    def served(self) -> list[float | None]:
        return list(self._served)

    def shadow_readings(self, since: float, now: float) -> ShadowReadings | None:
        found = self._increases(
            SHADOW_RESULTS, "result", SHADOW_BUCKETS, self.group_selector, since, now
        )
        if found is None:
            return None
        span, results, buckets, replicas = found
        return ShadowReadings(span, results, quantile(0.99, buckets), replicas)

    def shadow_served(self) -> list[float | None]:
        return list(self._shadow_served)


def _per_instance(instances: list[dict], values: list[dict]) -> list[float | None]:
    """Each replica's value (0 for one without the series), in `instances`' order."""
    by_instance = {r["metric"].get("instance", ""): float(r["value"][1]) for r in values}
    return [by_instance.get(r["metric"].get("instance", ""), 0.0) for r in instances]


def _value(result: dict) -> float:
    v = float(result["value"][1])
    return 0.0 if math.isnan(v) else v
