"""The gateway: every request is parsed, routed and handed to an Exchange.

`Gateway.handle` is the stream handler both HTTP versions call. It reads the config
snapshot once, so a reload never changes a request's decision half-way.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
import time
from collections.abc import Callable
from typing import Any

from aiohttp import web

from kom_gateway.config import ConfigError, load_config_file
from kom_gateway.config.diff import describe_changes
from kom_gateway.config.holder import Active, ConfigHolder, ReloadResult
from kom_gateway.http import engine as engines
from kom_gateway.http.stream import Headers, ServerStream
from kom_gateway.identity import PeerIdentity
from kom_gateway.overload.admission import Admission, Rejection
from kom_gateway.overload.load import LoadMeter, goaway_chance
from kom_gateway.proxy.accesslog import AccessLog
from kom_gateway.proxy.context import ProxyContext
from kom_gateway.proxy.exchange import Exchange, answer_status
from kom_gateway.proxy.metrics import Metrics
from kom_gateway.proxy.outcome import ANSWERED_BY_GATEWAY, Outcome, OutcomeRecorder
from kom_gateway.proxy.upgrade import handle_upgrade
from kom_gateway.proxy.upstreams import UpstreamEndpoint, Upstreams
from kom_gateway.requestinfo import parse_request
from kom_gateway.routing.cutover import Client
from kom_gateway.routing.router import DEFAULT_GROUP, Decision

log = logging.getLogger(__name__)
CLIENT_CACHE_SIZE = 16384
LOAD_SAMPLE_SECONDS = 0.25
DEADLINE_TICK = 0.25  # request timeouts fire at most this late


class Gateway:
    def __init__(
        self, holder: ConfigHolder, metrics: Metrics | None = None, engine: str | None = None
    ) -> None:
        self.holder = holder
        self.metrics = metrics or Metrics()
        # the HTTP/2 engine of both sides: --engine, else the config's http2.engine
        self.engine = engines.select(engine or holder.current.config.http2_engine)
        self.metrics.set_build_info(self.engine.name)
        self.upstreams = Upstreams(self._health_changed, self.engine)
        self.upstreams.sync(holder.current.config)
        self.metrics.config_generation.set(holder.current.generation)
        self._clients: dict[tuple[bytes, str, bytes], Client] = {}
        self.admission = Admission(holder.current.config.overload)
        self.access_log = AccessLog(holder.current.config.access_log)
        self.recorder = OutcomeRecorder(self.metrics, self.access_log)
        self.context = ProxyContext(
            self.upstreams, self.metrics, self.recorder, self.admission.buffers
        )
        self._sweeper = self._sweep_deadlines()
        self._reloading = asyncio.Lock()
        self.load_meter = LoadMeter()
        self.load = 0.0
        self._goaway_p = 0.0  # chance that an HTTP/2 request triggers GOAWAY, per request
        self.open_streams: Callable[[], int] = lambda: 0  # set by whoever serves us
        self._sampler: asyncio.TimerHandle | None = None
        self._cutover_children: tuple[int, dict[tuple, Any]] = (0, {})

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
    def start_load_sampling(self, interval: float = LOAD_SAMPLE_SECONDS) -> None:
        """Measure event-loop lag with a timer every `interval`, and from it and the
        rest of the load work out the GOAWAY chance once per interval (not per request)."""
        loop = asyncio.get_running_loop()
        due = loop.time() + interval

        def sample() -> None:
            nonlocal due
            now = loop.time()
            self.load_meter.observe_lag(now - due, interval)
            self.update_load()
            self.access_log.flush()
            self.metrics.flush()
            due = now + interval
            self._sampler = loop.call_at(due, sample)

        self._sampler = loop.call_at(due, sample)

    def update_load(self) -> None:
        policy = self.holder.current.config.goaway
        self.load = self.load_meter.load(self.admission.load(), self.open_streams(), policy)
        self._goaway_p = goaway_chance(self.load, policy)
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
        for group in a.watches.keys() | a.long_running.keys():
            long_running = a.watches.get(group, 0) + a.long_running.get(group, 0)
            m.child(m.in_flight, group, "long-running").set(long_running)

    async def drain(self, timeout: float) -> None:
        """Shutdown: let requests other than watches finish (up to `timeout`), then end
        the watches cleanly, so their clients re-watch on another replica."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline and any(not e.info.is_long_running for e in self.context.live):
            await asyncio.sleep(0.05)
        for exchange in self.exchanges:
            exchange.end_cleanly()

    def abort_all(self) -> None:
        """Stop every request still in progress (after draining, or in tests)."""
        for exchange in self.exchanges:
            exchange.cancel()

    def handle(self, stream: ServerStream) -> None:
        active = self.holder.current
        info = parse_request(stream.method, stream.target)
        client = self.client_for(stream.headers, stream.remote_addr, stream.peer)
        if info.bad_target:
            answer_status(stream, 400, "BadRequest", f"malformed request target: {info.malformed}")
            self.recorder.record(Outcome(client, info, None, ANSWERED_BY_GATEWAY, 400), "none")
            return
        decision = active.router.decide(info, client)
        if decision.home != DEFAULT_GROUP:
            self.metrics.count(self._cutover_counter(active, decision))
        verdict = self.admission.admit(info, client, decision.target, time.monotonic())
        if isinstance(verdict, Rejection):
            answer_status(stream, 429, "TooManyRequests", verdict.message, verdict.retry_after)
            m = self.metrics
            m.child(m.shed, decision.target, verdict.reason).inc()
            outcome = Outcome(client, info, decision, ANSWERED_BY_GATEWAY, 429)
            self.recorder.record(outcome, decision.target)
        else:
            Exchange(self.context, stream, info, client, decision, active, verdict).start()
        if self._goaway_p and stream.http_version == "2" and random.random() < self._goaway_p:
            stream.goaway_connection("load")

    def _cutover_counter(self, active: Active, decision: Decision) -> Any:
        """The cut-over counter of a decision, labelled with its rule's match as operators
        wrote it (labels worked out once per configuration generation)."""
        key = (decision.rule, decision.home, decision.target)
        generation, children = self._cutover_children
        if generation != active.generation:
            children = {}
            self._cutover_children = (active.generation, children)
        child = children.get(key)
        if child is None:
            if decision.rule is None:
                label = "none"
            else:
                rule = next((r for r in active.config.cutover if r.index == decision.rule), None)
                label = rule.match.describe() if rule else f"[{decision.rule}]"
            m = self.metrics
            child = children[key] = m.child(m.cutover, label, decision.home, decision.target)
        return child

    def client_for(self, headers: Headers, remote_addr: str, peer: PeerIdentity | None) -> Client:
        """Who is asking, for the cut-over bucket; cached (its bucket and rule memoised)."""
        user_agent = b""
        authorization = b""
        for name, value in headers:
            if name == b"user-agent":
                user_agent = value
            elif name == b"authorization":
                authorization = value
        key = (authorization, peer.key if peer else remote_addr, user_agent)
        client = self._clients.get(key)
        if client is None:
            client = _new_client(remote_addr, peer, user_agent, authorization)
            if len(self._clients) >= CLIENT_CACHE_SIZE:
                self._clients.clear()
            self._clients[key] = client
        return client

    async def upgrade(self, request: web.BaseRequest) -> web.StreamResponse:
        return await handle_upgrade(self, request)

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
                self.access_log.configure(config.access_log)
            if result.applied:
                self.metrics.config_reloads.labels("applied").inc()
                self.metrics.config_generation.set(result.generation)
                log.info(
                    "configuration generation %d applied from %s:\n  %s",
                    result.generation,
                    path,
                    "\n  ".join(describe_changes(old, config)),
                )
            else:
                self.metrics.config_reloads.labels("rejected").inc()
                assert result.error is not None
                log.error(
                    "configuration rejected, still serving generation %d:\n%s",
                    result.generation,
                    result.error.render(),
                )
            return result

    def _health_changed(self, endpoint: UpstreamEndpoint, healthy: bool, reason: str) -> None:
        m = self.metrics
        m.endpoint_healthy.labels(endpoint.group, endpoint.name).set(1 if healthy else 0)
        if not healthy:
            m.ejections.labels(endpoint.group, endpoint.name, reason).inc()

    async def close(self) -> None:
        self._sweeper.cancel()
        if self._sampler is not None:
            self._sampler.cancel()
        self.access_log.close()
        self.metrics.flush()
        await self.upstreams.close()


def _new_client(
    remote_addr: str, peer: PeerIdentity | None, user_agent: bytes, authorization: bytes
) -> Client:
    """The cut-over key: the verified certificate's identity (what the apiserver will
    authenticate), else a digest of the bearer token, else the address."""
    ua = user_agent.decode("latin-1")
    if peer is not None:
        return Client(ua, peer.key, remote_addr, peer.user, peer.groups)
    if authorization[:7].lower() == b"bearer ":
        digest = hashlib.sha256(authorization[7:].strip()).hexdigest()[:32]
        return Client(ua, f"token:{digest}", remote_addr)
    return Client(ua, "", remote_addr)
