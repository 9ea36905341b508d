"""Prometheus metrics of the data plane (prometheus-client, Prometheus naming rules).

With `--workers N` every worker writes its samples to files (prometheus-client's
multiprocess mode) and the supervisor serves the sum; each gauge says how workers'
values combine (`multiprocess_mode`), so nothing here may be a callback gauge."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from kom_gateway import __version__, compat, compiled

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"  # set: this process is one of `--workers N`
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


def written_to_files() -> bool:
    """This process is a worker of `--workers N`: its metrics go to files that the
    supervisor reads and sums, which it cannot ask to be brought up to date."""
    return bool(os.environ.get(MULTIPROC_ENV))


class CounterTally:
    """A counter child's increments since the last flush."""

    def __init__(self, child: Any) -> None:
        self.child = child
        self.amount = 0.0


class HistogramTally:
    """A histogram child's observations since the last flush, per bucket: compiled, the
    bucket is a scan of the child's bounds in C, with no float or lock per request."""

    def __init__(self, child: Any) -> None:
        self.child = child
        self.bounds: list[float] = compat.histogram_upper_bounds(child)  # +Inf last
        self.sum = 0.0
        self.counts: list[int] = [0] * len(self.bounds)

    def observe(self, value: float) -> None:
        self.sum += value
        bounds = self.bounds
        i = 0
        while bounds[i] < value:  # the first bound >= value, as observe() finds it
            i += 1
        self.counts[i] += 1

    def flush(self) -> None:
        if any(self.counts):
            compat.histogram_add(self.child, [self.sum, *self.counts])
            self.sum = 0.0
            self.counts = [0] * len(self.bounds)


class Series:
    """The counters and histograms one kind of request adds to, resolved once
    (`Metrics.series`), so that recording a request is one call."""

    def __init__(self, counters: list[CounterTally], histograms: list[HistogramTally]) -> None:
        self.counters = counters
        self.histograms = histograms

    def add(self, value: float) -> None:
        """Count one in each counter and observe `value` in each histogram."""
        for counter in self.counters:
            counter.amount += 1.0
        for histogram in self.histograms:
            histogram.observe(value)


class Metrics:
    def child(self, metric: Any, *values: str) -> Any:
        """`metric.labels(*values)`, cached: labels() takes a lock and builds keys, and the
        hot path asks for the same few children on every request."""
        key = (id(metric), values)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*values)
        return found

    def tally(self, child: Any) -> CounterTally:
        """A counter child's tally, kept across flushes (one per child: a bounded set)."""
        found = self._counter_tallies.get(child)
        if found is None:
            found = self._counter_tallies[child] = CounterTally(child)
        return found

    def group_bytes(self, group: str) -> tuple[CounterTally, CounterTally]:
        """The tallies of the bytes received from and sent to `group`'s apiservers: one
        look-up per upstream attempt, a float added per chunk."""
        found = self._group_bytes.get(group)
        if found is None:
            found = self._group_bytes[group] = (
                self.tally(self.child(self.received_bytes, group)),
                self.tally(self.child(self.sent_bytes, group)),
            )
        return found

    def count(self, child: Any, amount: float = 1) -> None:
        """Add to a counter child, batched: a float added per request instead of
        prometheus-client's locked increment. Reaches the counter on `flush()`: before
        every scrape, and in a worker every second (gateway.METRICS_FLUSH_SECONDS)."""
        self.tally(child).amount += amount

    def series(self, counters: tuple[Any, ...], histograms: tuple[Any, ...]) -> Series:
        """The tallies of these counter and histogram children, batched as `count` is:
        they reach the children on `flush()` (histograms through `compat`:
        prometheus-client has no public batch API; tests compare against `observe()`).
        A child has one tally, kept across flushes: a bounded set."""
        tallies = [self.tally(child) for child in counters]
        histogram_tallies = self._histogram_tallies
        observed: list[HistogramTally] = []
        for child in histograms:
            entry = histogram_tallies.get(child)
            if entry is None:
                entry = histogram_tallies[child] = HistogramTally(child)
            observed.append(entry)
        return Series(tallies, observed)

    def add(self, counters: tuple[Any, ...], histograms: tuple[Any, ...], value: float) -> None:
        """Count one in each of `counters` and observe `value` in each of `histograms`
        (children; a request path resolves its `series` once instead)."""
        self.series(counters, histograms).add(value)

    def flush(self) -> None:
        """Hand the batched counts to prometheus-client, and set the sampled gauges
        (`samplers`): before every scrape, and in a worker every second."""
        for sample in self.samplers:
            sample()
        for counter in self._counter_tallies.values():
            if counter.amount:
                counter.child.inc(counter.amount)
                counter.amount = 0.0
        for histogram in self._histogram_tallies.values():
            histogram.flush()

    python_version = ".".join(map(str, sys.version_info[:3]))

    def set_build_info(self, engine: str) -> None:
        core = "compiled" if compiled.is_compiled() else "python"
        self.build_info.labels(__version__, engine, self.python_version, core).set(1)

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        # set gauges of values kept elsewhere (load, in flight, connections): a gauge
        # read at a scrape, not set at every change (prometheus-client's set is a
        # few Python calls and a lock)
        self.samplers: list[Callable[[], None]] = []
        self._counter_tallies: dict[Any, CounterTally] = {}
        self._histogram_tallies: dict[Any, HistogramTally] = {}
        self._group_bytes: dict[str, tuple[CounterTally, CounterTally]] = {}
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.build_info = Gauge(
            "kom_gateway_build_info",
            "1, labelled with the version, the HTTP/2 engine, the Python version and "
            "whether the request path runs compiled (core) or interpreted.",
            ["version", "engine", "python", "core"],
            registry=r,
            multiprocess_mode="max",
        )
        self.requests = Counter(
            "kom_gateway_requests",
            "Requests answered, by the group that answered them ('none': the gateway "
            "refused a malformed target). exec, attach, port-forward and log show as "
            "their subresource. A resource or subresource no apiserver has yet answered "
            "with success is '(unverified)': the path is the client's.",
            ["group", "verb", "resource", "subresource", "code"],
            registry=r,
        )
        self.duration = Histogram(
            "kom_gateway_request_duration_seconds",
            "Time to complete non-long-running requests, by answering group.",
            ["group", "verb"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge(
            "kom_gateway_inflight_requests",
            "Requests in flight by target group and kind (short, long-running, exempt, "
            "queued: waiting for a seat of a full group, or of their client past its "
            "share; sampled every 250 ms; upgrade: "
            "exec/attach/port-forward streams).",
            ["group", "kind"],
            registry=r,
            multiprocess_mode="livesum",
        )
        self.watches = Gauge(
            "kom_gateway_open_watches",
            "Watch streams currently open, by group.",
            ["group"],
            registry=r,
            multiprocess_mode="livesum",
        )
        self.fallbacks = Counter(
            "kom_gateway_fallbacks",
            "Requests moved off their chosen group, by reason.",
            ["from_group", "to_group", "reason"],
            registry=r,
        )
        self.broken_responses = Counter(
            "kom_gateway_broken_responses",
            "Responses whose upstream failed after they started (watches ended cleanly, "
            "others reset).",
            ["group", "verb"],
            registry=r,
        )
        self.endpoint_healthy = Gauge(
            "kom_gateway_upstream_endpoint_healthy",
            "1 if the apiserver endpoint takes traffic.",
            ["group", "endpoint"],
            registry=r,
            multiprocess_mode="livemin",
        )
        self.ejections = Counter(
            "kom_gateway_upstream_ejections",
            "Times an apiserver endpoint was taken out of rotation, by reason: "
            "consecutive-failures (outlier ejection), probe, connect-error.",
            ["group", "endpoint", "reason"],
            registry=r,
        )
        self.received_bytes = Counter(
            "kom_gateway_received_bytes",
            "Response bytes received from apiservers.",
            ["group"],
            registry=r,
        )
        self.sent_bytes = Counter(
            "kom_gateway_sent_bytes",
            "Request body bytes sent to apiservers.",
            ["group"],
            registry=r,
        )
        self.config_reloads = Counter(
            "kom_gateway_config_reloads",
            "Configuration reload attempts by result.",
            ["result"],
            registry=r,
        )
        self.tls_reloads = Counter(
            "kom_gateway_tls_reloads",
            "Certificate files re-read after they changed, by side and result.",
            ["side", "result"],
            registry=r,
        )
        self.client_connections = Gauge(
            "kom_gateway_client_connections",
            "Client connections open, by protocol (tls-handshake: not through it yet).",
            ["protocol"],
            registry=r,
            multiprocess_mode="liveall",  # per worker (pid label): shows how they share
        )
        self.connections_rejected = Counter(
            "kom_gateway_client_connections_rejected",
            "Client connections turned away before a request, by reason.",
            ["reason"],
            registry=r,
        )
        self.http2_abuse = Counter(
            "kom_gateway_http2_abuse",
            "HTTP/2 client connections cut off (GOAWAY ENHANCE_YOUR_CALM or protocol error), "
            "by kind.",
            ["kind"],
            registry=r,
        )
        self.shed = Counter(
            "kom_gateway_shed_requests",
            "Requests answered 429 + Retry-After by the gateway itself, by target group and "
            "reason (inflight, watches, rate-limit, client-inflight, client-buffer).",
            ["group", "reason"],
            registry=r,
        )
        self.client_buffered = Gauge(
            "kom_gateway_client_buffered_bytes",
            "Response bytes held for clients that have not read them yet (sampled).",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.client_buffered_max = Gauge(
            "kom_gateway_client_buffered_bytes_max",
            "Response bytes held for the one client holding most (sampled); past "
            "overload.perClient.maxBufferedBytes it gets 429s until it reads.",
            registry=r,
            multiprocess_mode="livemax",
        )
        self.clients_over_budget = Gauge(
            "kom_gateway_clients_over_budget",
            "Clients past overload.perClient.maxBufferedBytes now (sampled).",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.client_inflight_max = Gauge(
            "kom_gateway_client_inflight_max",
            "Requests in flight of the busiest client (sampled); its limit is "
            "overload.perClient.maxInflight.",
            registry=r,
            multiprocess_mode="livemax",
        )
        self.cutover = Counter(
            "kom_gateway_cutover_decisions",
            "Requests for claimed resources by cut-over rule (its match, or 'none') and where "
            "they went: the claiming group (home_group) or default. The cut-over share of a "
            "rule is chosen_group == home_group over all.",
            ["rule", "home_group", "chosen_group"],
            registry=r,
        )
        self.cutover_outcomes = Counter(
            "kom_gateway_cutover_outcomes",
            "Requests a cut-over rule moved off default, by the rule (its match), the group "
            "it moved them to and how they ended: the group's answer by code class (2xx, "
            "3xx, 4xx, 5xx), broken (the group failed mid-response), fallback (the group "
            "failed and the request was answered elsewhere) or gateway (the gateway's own "
            "answer, e.g. a 429). What `kom-gateway rollout` guards read.",
            ["rule", "group", "outcome"],
            registry=r,
        )
        self.cutover_duration = Histogram(
            "kom_gateway_cutover_request_duration_seconds",
            "Time to complete non-long-running requests a cut-over rule moved, answered by "
            "the group it moved them to.",
            ["rule", "group"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.shadow_requests = Counter(
            "kom_gateway_shadow_requests",
            "Shadow reads of a cut-over rule's clients still on default, by the rule (its "
            "match), the candidate group and the result: match, mismatch (reason: status, "
            "missing, extra, content, too-old), error (the candidate failed: 5xx, throttled, "
            "reset, timeout, connect) or skipped (sampled but not compared: budget, "
            "in-flight, load, ejected, refused, default-failed, encoding, ...).",
            ["rule", "group", "result", "reason"],
            registry=r,
        )
        self.shadow_duration = Histogram(
            "kom_gateway_shadow_duration_seconds",
            "Time the candidate group took to answer compared shadow reads.",
            ["group"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.shadow_default_duration = Histogram(
            "kom_gateway_shadow_default_duration_seconds",
            "Time default took to answer the same reads (those compared), by candidate group.",
            ["group"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.shadow_percent = Gauge(
            "kom_gateway_shadow_percent",
            "The configured shadow percent of each rule (its match) for its candidate group.",
            ["rule", "group"],
            registry=r,
            multiprocess_mode="max",
        )
        self.goaways = Counter(
            "kom_gateway_goaways_sent",
            "Graceful GOAWAYs sent to HTTP/2 clients, by reason (load, max-age, idle, drain).",
            ["reason"],
            registry=r,
        )
        self.load = Gauge(
            "kom_gateway_load",
            "This replica's load (1 = at capacity): the largest of the fullest group's share "
            "of its in-flight limit, event-loop lag and open streams against their budgets.",
            registry=r,
            multiprocess_mode="livemax",
        )
        self.loop_lag = Gauge(
            "kom_gateway_event_loop_lag_seconds",
            "Event-loop lag, smoothed over about 2 seconds.",
            registry=r,
            multiprocess_mode="livemax",
        )
        self.config_last_reload_successful = Gauge(
            "kom_gateway_config_last_reload_successful",
            "1 if the last configuration (at start or reload) was applied, 0 if it was "
            "refused and an older one is serving (as Prometheus' own metric).",
            registry=r,
            multiprocess_mode="livemin",
        )
        self.config_last_reload_success = Gauge(
            "kom_gateway_config_last_reload_success_timestamp_seconds",
            "When a configuration was last applied (Unix time).",
            registry=r,
            multiprocess_mode="livemax",
        )
        self.cutover_percent = Gauge(
            "kom_gateway_cutover_percent",
            "The configured cut-over percent of each rule (its match) for each group; "
            "compare with the observed share from kom_gateway_cutover_decisions_total.",
            ["rule", "group"],
            registry=r,
            multiprocess_mode="max",
        )
        self.config_generation = Gauge(
            "kom_gateway_config_generation",
            "Generation of the configuration being served.",
            registry=r,
            multiprocess_mode="livemin",
        )
