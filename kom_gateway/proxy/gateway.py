"""The gateway: what one serving process holds together, and its life.

It builds the request path (`intake.py`: one way in for every request; its carriers,
`exchange.py` and `upgrade.py`) over the upstream pools, admission, metrics and access
log; measures load and sets the GOAWAY chance from it; reloads the configuration; drains.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from kom_gateway.config import Config, ConfigError, load_config_file
from kom_gateway.config.diff import describe_changes
from kom_gateway.config.holder import ConfigHolder, ReloadResult
from kom_gateway.config.model import AccessLogSettings
from kom_gateway.http import engine as engines
from kom_gateway.overload.admission import Admission
from kom_gateway.overload.load import LoadMeter, goaway_chance
from kom_gateway.proxy.accesslog import AccessLog
from kom_gateway.proxy.context import ProxyContext
from kom_gateway.proxy.exchange import Exchange
from kom_gateway.proxy.intake import Intake
from kom_gateway.proxy.metrics import Metrics, written_to_files
from kom_gateway.proxy.outcome import OutcomeRecorder
from kom_gateway.proxy.upstreams import UpstreamEndpoint, Upstreams
from kom_gateway.shadow.reads import ShadowReads

log = logging.getLogger(__name__)
LOAD_SAMPLE_SECONDS = 0.25
# a worker's batched counters reach its files this often (a single process flushes
# only before a scrape): each flush is a locked increment per child touched, ~0.4M
# instructions; the supervisor's scrape shows a worker's figures this much behind at most
METRICS_FLUSH_SECONDS = 1.0
DEADLINE_TICK = 0.25  # request timeouts fire at most this late


class Gateway:
    def __init__(
        self,
        holder: ConfigHolder,
        metrics: Metrics | None = None,
        engine: str | None = None,
        overridden: dict[str, str] | None = None,
        access_log: AccessLogSettings | None = None,
    ) -> None:
        self.holder = holder
        self._access_log_override = access_log  # in place of every config's accessLog
        self.overridden = overridden or {}  # config keys a command-line flag replaces
        self.metrics = metrics or Metrics()
        # the HTTP/2 engine of both sides: --engine, else the config's http2.engine
        self.engine = engines.select(engine or holder.current.config.http2_engine)
        self.metrics.set_build_info(self.engine.name)
        self.load_meter = LoadMeter()
        self.upstreams = Upstreams(self._health_changed, self.engine, self._loop_lag)
        self.upstreams.sync(holder.current.config)
        self._gauge_labels: dict[Any, set[tuple[str, str]]] = {}
        self._config_applied(holder.current.config, holder.current.generation)
        self.admission = Admission(holder.current.config.overload)
        self.access_log = AccessLog(access_log or holder.current.config.access_log)
        self.recorder = OutcomeRecorder(self.metrics, self.access_log)
        self.shadows = ShadowReads(self.upstreams, self.metrics)
        self.context = ProxyContext(
            self.upstreams, self.metrics, self.recorder, self.admission.buffers, self.shadows
        )
        self.intake = Intake(holder, self.admission, self.context)
        self._sweeper = self._sweep_deadlines()
        self._reloading = asyncio.Lock()
        self.load = 0.0
        self._open_streams: Callable[[], int] = lambda: 0  # HTTP/2 streams being served
        self._sampler: asyncio.TimerHandle | None = None
        self.metrics.samplers.append(self._sample_gauges)

    def _loop_lag(self) -> float:
        return self.load_meter.lag

    @property
    def exchanges(self) -> list[Exchange]:
        """Requests being carried now."""
        return self.context.exchanges()

    def _sweep_deadlines(self) -> asyncio.TimerHandle:
        """Request timeouts: one timer for all requests, every DEADLINE_TICK."""
        loop = asyncio.get_running_loop()

        def sweep() -> None:
            self.context.expire(time.monotonic())
            self._sweeper = loop.call_later(DEADLINE_TICK, sweep)

        return loop.call_later(DEADLINE_TICK, sweep)

    # -- load --------------------------------------------------------------------------
    def start_load_sampling(
        self, open_streams: Callable[[], int], interval: float = LOAD_SAMPLE_SECONDS
    ) -> None:
        """Measure event-loop lag with a timer every `interval`, and from it, the streams
        being served (`open_streams`) and the rest of the load work out the GOAWAY chance
        once per interval (not per request)."""
        self._open_streams = open_streams
        loop = asyncio.get_running_loop()
        due = loop.time() + interval
        flush_due = due
        # one process flushes its batched metrics as a scrape reads them (admin.py), not
        # every second for nobody; a worker's files need the timer
        flush_periodically = written_to_files()

        def sample() -> None:
            nonlocal due, flush_due
            now = loop.time()
            self.load_meter.observe_lag(now - due, interval)
            self.update_load()
            self.access_log.flush()
            if flush_periodically and now >= flush_due:
                self.metrics.flush()
                flush_due = now + METRICS_FLUSH_SECONDS
            due = now + interval
            self._sampler = loop.call_at(due, sample)

        self._sampler = loop.call_at(due, sample)

    def update_load(self) -> None:
        policy = self.holder.current.config.goaway
        # counting open streams walks every client connection: only when it counts
        streams = self._open_streams() if policy.stream_budget > 0 else 0
        self.load = self.load_meter.load(self.admission.load(), streams, policy)
        self.intake.goaway_chance = goaway_chance(self.load, policy)
        self.shadows.load = self.load

    def _sample_gauges(self) -> None:
        """The load and the requests in flight, as of the last load sample."""
        m = self.metrics
        m.load.set(self.load)
        m.loop_lag.set(self.load_meter.lag)
        # in flight, from the admission counts (one source, not a second count per request)
        a = self.admission
        m.client_buffered.set(a.buffers.total)
        m.client_buffered_max.set(a.buffers.largest())
        m.clients_over_budget.set(a.buffers.clients_over_budget())
        m.client_inflight_max.set(max(a.client_inflight.values(), default=0))
        for group, count in a.inflight.items():
            m.child(m.in_flight, group, "short").set(count)
        for group, count in a.exempt.items():
            m.child(m.in_flight, group, "exempt").set(count)
        waiting = a.queued_by_group()
        for group in a.inflight.keys() | waiting.keys():
            m.child(m.in_flight, group, "queued").set(waiting.get(group, 0))
        for group in a.watches.keys() | a.long_running.keys():
            long_running = a.watches.get(group, 0) + a.long_running.get(group, 0)
            m.child(m.in_flight, group, "long-running").set(long_running)

    async def drain(self, timeout: float) -> None:
        """Shutdown: let requests other than watches finish (up to `timeout`), then end
        the watches cleanly, so their clients re-watch on another replica, and end the
        exec/attach/port-forward sessions."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline and any(not e.info.is_long_running for e in self.context.live):
            await asyncio.sleep(0.05)
        for exchange in self.exchanges:
            exchange.end_cleanly()
        for session in list(self.context.upgrades):  # exec, attach, port-forward
            session.cancel()

    def abort_all(self) -> None:
        """Stop every request still in progress (after draining, or in tests)."""
        for exchange in self.exchanges:
            exchange.cancel()
        for session in list(self.context.upgrades):
            session.cancel()

    async def reload(self, path: str) -> ReloadResult:
        """Re-read `path`; a config that fails validation, or whose TLS files cannot be
        loaded, is refused and the last good one keeps serving. The file is parsed and
        validated in a thread (a large one takes seconds: requests keep flowing), one
        reload at a time."""
        async with self._reloading:
            old = self.holder.current.config
            try:
                config = await asyncio.to_thread(load_config_file, path)
                self.upstreams.sync(config)  # raises before changing anything
            except ConfigError as exc:
                result = self.holder.refuse(exc)
            else:
                result = self.holder.apply(config)
                self.admission.configure(config.overload)
                self.access_log.configure(self._access_log_override or config.access_log)
            if result.applied:
                self.metrics.config_reloads.labels("applied").inc()
                self._config_applied(config, result.generation)
                log.info(
                    "configuration generation %d applied from %s:\n  %s",
                    result.generation,
                    path,
                    "\n  ".join(describe_changes(old, config, self.overridden)),
                )
            else:
                self.metrics.config_reloads.labels("rejected").inc()
                self.metrics.config_last_reload_successful.set(0)
                assert result.error is not None
                log.error(
                    "configuration rejected, still serving generation %d:\n%s",
                    result.generation,
                    result.error.render(),
                )
            return result

    def _config_applied(self, config: Config, generation: int) -> None:
        """What Prometheus should know of the configuration now serving."""
        m = self.metrics
        m.config_generation.set(generation)
        m.config_last_reload_successful.set(1)
        m.config_last_reload_success.set(time.time())
        cutover = {
            (rule.label, group): percent
            for rule in config.cutover
            for group, percent in rule.percent.items()
        }
        shadow = {
            (rule.label, rule.shadow.group): rule.shadow.percent
            for rule in config.cutover
            if rule.shadow is not None
        }
        self._set_gauge(m.cutover_percent, cutover)
        self._set_gauge(m.shadow_percent, shadow)

    def _set_gauge(self, gauge: Any, values: dict[tuple[str, str], float]) -> None:
        """A labelled gauge set to exactly `values`: series no longer there removed."""
        for labels in self._gauge_labels.get(gauge, set()) - values.keys():
            if written_to_files():  # workers' files cannot drop a series: 0
                gauge.labels(*labels).set(0)
            else:
                gauge.remove(*labels)
        for labels, percent in values.items():
            gauge.labels(*labels).set(percent)
        self._gauge_labels[gauge] = set(values)

    def _health_changed(self, endpoint: UpstreamEndpoint, healthy: bool, reason: str) -> None:
        m = self.metrics
        m.endpoint_healthy.labels(endpoint.group, endpoint.name).set(1 if healthy else 0)
        if not healthy:
            m.ejections.labels(endpoint.group, endpoint.name, reason).inc()

    async def close(self) -> None:
        self.shadows.close()
        self._sweeper.cancel()
        if self._sampler is not None:
            self._sampler.cancel()
        self.access_log.close()
        self.metrics.flush()
        await self.upstreams.close()
