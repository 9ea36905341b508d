"""Apiserver endpoints per group: HTTP/2 connection pools, health, and endpoint choice.

- Each endpoint keeps as many multiplexed connections as its MAX_CONCURRENT_STREAMS
  requires (a full connection makes the next request open another).
- Health (`health.py`): probes and outlier ejection. An endpoint that comes back
  receives new requests at once, because the choice is per request.
- Choice within a group: the healthy endpoint with the fewest requests in flight (ties
  in turn).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import ssl
import time
from collections.abc import Callable

from kom_gateway.compat import LoopTLSObject
from kom_gateway.config.model import Config, ConfigError, Endpoint, Health
from kom_gateway.config.model import UpstreamTLS as UpstreamTLSConfig
from kom_gateway.config.tlscheck import tls_problems
from kom_gateway.http.client import (
    RESET_GOAWAY,
    ClientStream,
    ConnectError,
    HTTP2ClientConnection,
    StreamRefused,
)
from kom_gateway.http.engine import Engine
from kom_gateway.http.settings import H2ClientSettings
from kom_gateway.http.stream import Headers
from kom_gateway.kube.identity import identity_headers
from kom_gateway.proxy.health import (
    EJECT_CONNECT,
    EJECT_FAILURES,
    EJECT_PROBE,
    EndpointHealth,
)
from kom_gateway.proxy.settings import upstream_settings
from kom_gateway.routing.router import DEFAULT_GROUP
from kom_gateway.server.tlsfiles import ReloadingContext

log = logging.getLogger(__name__)

# told (endpoint, available, why it was taken out) whenever availability changes
HealthListener = Callable[["UpstreamEndpoint", bool, str], None]


# a probe that timed out while the gateway's loop ran later than this share of the probe
# timeout is no verdict (a probe's round trip waits for a few loop passes)
PROBE_LAG_SHARE = 0.25
PROBE_IDENTITY = identity_headers("system:anonymous", ("system:unauthenticated",), {})


def _no_lag() -> float:
    return 0.0


class UpstreamEndpoint:
    def __init__(
        self,
        group: str,
        spec: Endpoint,
        settings: H2ClientSettings,
        tls: UpstreamTLS,
        server_name: str | None,
        health: Health,
        on_health: HealthListener,
        connection_class: type[HTTP2ClientConnection],
    ) -> None:
        self.group = group
        self.connection_class = connection_class
        self.spec = spec
        self.name = str(spec)
        self.settings = settings
        self.tls = tls
        self.server_name = server_name or spec.host
        self.authority = (
            f"{spec.host}:{spec.port}" if ":" not in spec.host else f"[{spec.host}]:{spec.port}"
        )
        self.health = EndpointHealth(health)
        self.peers: list[UpstreamEndpoint] = [self]  # its group's endpoints (set by Upstreams)
        # the event loop's recent lag in seconds, which a probe's timeout is judged
        # against (set by Upstreams: the load meter's)
        self.loop_lag: Callable[[], float] = _no_lag
        self._announced = True  # the availability last told to the listener
        self._return_timer: asyncio.TimerHandle | None = None
        self.in_flight = 0
        self.connections: list[HTTP2ClientConnection] = []
        self._connecting: asyncio.Task[HTTP2ClientConnection] | None = None
        self._on_health = on_health
        self._probe_now = asyncio.Event()
        self._prober: asyncio.Task[None] | None = None
        self.closed = False

    @property
    def healthy(self) -> bool:
        """Takes requests now: its probes pass and it is not ejected."""
        return self.health.available(time.monotonic())

    # -- connections ---------------------------------------------------------------------
    def ready_connection(self) -> HTTP2ClientConnection | None:
        """An open connection with room for one more stream, without waiting (the usual
        case: the exchange then needs no task at all)."""
        for conn in self.connections:
            if conn.has_capacity():
                return conn
        return None

    async def connection(self) -> HTTP2ClientConnection:
        """A connection with room for one more stream (opening one if needed)."""
        while True:
            self.connections = [c for c in self.connections if not c.closed]
            for conn in self.connections:
                if conn.has_capacity():
                    return conn
            if self.closed:
                raise ConnectError(f"{self.name}: endpoint removed from the configuration")
            if self._connecting is None:
                self._connecting = asyncio.get_running_loop().create_task(self._connect())
                # waiters may all be gone (cancelled): the failure is still observed
                self._connecting.add_done_callback(lambda t: t.cancelled() or t.exception())
            task = self._connecting
            try:
                conn = await asyncio.shield(task)
            except ConnectError:
                self.report_failure(connect_error=True)
                raise
            if conn.has_capacity():
                return conn

    async def _connect(self) -> HTTP2ClientConnection:
        try:
            conn = await self.connection_class.connect(
                self.spec.host,
                self.spec.port,
                self.settings,
                self.tls.h2 if self.spec.scheme == "https" else None,
                self.server_name,
            )
            self.connections.append(conn)
            return conn
        finally:
            self._connecting = None

    # -- health --------------------------------------------------------------------------
    def report_success(self) -> None:
        self.health.success()

    def report_failure(self, connect_error: bool = False) -> None:
        """A request failed here (5xx, reset, timeout; or its connection was refused)."""
        if connect_error:
            if self.health.connect_failed():
                log.warning("endpoint %s (%s) is down: connection failed", self.name, self.group)
                self._announce(EJECT_CONNECT)
            self._probe_now.set()
            return
        now = time.monotonic()
        # a group's last endpoint too, but for default's: the others fall back to it
        may_eject = self.group != DEFAULT_GROUP or any(
            p is not self and p.health.available(now) for p in self.peers
        )
        if self.health.failure(now, may_eject):
            seconds = self.health.ejected_until - now
            log.warning(
                "endpoint %s (%s) ejected for %.0fs after %d failed requests in a row",
                self.name,
                self.group,
                seconds,
                self.health.policy.consecutive_failures,
            )
            self._announce(EJECT_FAILURES)
            if self._return_timer is not None:
                self._return_timer.cancel()
            loop = asyncio.get_running_loop()
            self._return_timer = loop.call_later(seconds, self._ejection_over)
        elif self.health.wants_probe():
            self._probe_now.set()  # the group's last endpoint: its probe decides

    def _ejection_over(self) -> None:
        self._return_timer = None
        if self.healthy:
            log.info("endpoint %s (%s) is back after its ejection", self.name, self.group)
        self._announce("")

    def _announce(self, reason: str) -> None:
        """Tell the listener if availability changed since it was last told."""
        healthy = self.healthy
        if healthy != self._announced:
            self._announced = healthy
            self._on_health(self, healthy, reason)

    def start_probing(self, interval: float, timeout: float) -> None:
        self._prober = asyncio.get_running_loop().create_task(self._probe_loop(interval, timeout))

    async def _probe_loop(self, interval: float, timeout: float) -> None:
        await asyncio.sleep(random.uniform(0, min(interval, 1.0)))  # spread the first probes
        while not self.closed:
            ok = await self.probe(timeout)
            changed = None if ok is None else self.health.probe_result(ok)
            if changed is True:
                log.info("endpoint %s (%s) passes its probe again", self.name, self.group)
            elif changed is False:
                log.warning("endpoint %s (%s) failed its probes", self.name, self.group)
            self._announce(EJECT_PROBE)
            self._probe_now.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(interval):
                    await self._probe_now.wait()
                    await asyncio.sleep(0.1)  # coalesce a burst of connect failures

    async def probe(self, timeout: float) -> bool | None:
        """GET /readyz; healthy on a 200 that ends cleanly within `timeout`.

        A timeout while the gateway's own event loop ran late (`loop_lag`: its recent
        lag; or this probe's deadline passing unnoticed) is no verdict: in a reconnect
        storm the loop can be seconds behind, the probe's answer unread, and a healthy
        endpoint (default's only one, say) taken out would turn the storm into 503s.
        Requests that fail still eject it (`report_failure`), and a refused connection
        is a verdict at once.

        The probe says it is anonymous, in front-proxy headers: sent bare over a
        connection with the front-proxy certificate, kube-apiserver would answer 401 (that
        certificate fails its x509 authenticator) and every endpoint would look down.
        Anonymous may read /readyz (system:public-info-viewer), and claims nothing more.
        """
        probe = _Probe()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        try:
            async with asyncio.timeout_at(deadline):
                conn = await self.connection()
                headers: Headers = [
                    (b":method", b"GET"),
                    (b":scheme", self.spec.scheme.encode()),
                    (b":authority", self.authority.encode()),
                    (b":path", b"/readyz"),
                    (b"user-agent", b"kom-gateway-health"),
                    *PROBE_IDENTITY,
                ]
                probe.stream = conn.open_stream(headers, True, probe)
                return await probe.result
        except StreamRefused:
            return None  # the connection is going away: no verdict
        except TimeoutError:
            late = loop.time() - deadline
            if max(late, self.loop_lag()) > timeout * PROBE_LAG_SHARE:
                return None  # our own loop was too far behind to judge the endpoint
            return False
        except (ConnectError, OSError):
            return False
        finally:
            if probe.stream is not None and not probe.result.done():
                probe.stream.cancel()

    async def close(self) -> None:
        self.closed = True
        if self._prober is not None:
            self._prober.cancel()
        for conn in self.connections:
            if not conn.streams:
                conn.close()
            else:
                conn.draining = True  # finish what runs, then close


class _Probe:
    """Result: True (200, then a clean end), False (anything else), None (GOAWAY'd: ask
    again). The whole response is judged: 200 headers and then a reset is a failure."""

    def __init__(self) -> None:
        self.result: asyncio.Future[bool | None] = asyncio.get_running_loop().create_future()
        self.stream: ClientStream | None = None
        self.status = 0

    def on_response(self, status: int, headers: Headers) -> None:
        self.status = status

    def on_data(self, data: bytes, flow_len: int) -> None:
        if self.stream is not None:
            self.stream.ack(flow_len)

    def on_end(self) -> None:
        if not self.result.done():
            self.result.set_result(self.status == 200)

    def on_reset(self, kind: str, reason: str) -> None:
        if not self.result.done():
            self.result.set_result(None if kind == RESET_GOAWAY else False)


class Upstreams:
    """All groups' endpoints; kept in step with the configuration on reload."""

    def __init__(
        self,
        on_health: HealthListener,
        engine: Engine,
        loop_lag: Callable[[], float] | None = None,
    ) -> None:
        """`loop_lag`: the event loop's recent lag in seconds (the load meter's), which
        a probe's timeout is judged against."""
        self.engine = engine
        self.loop_lag = loop_lag or _no_lag
        self.tls = UpstreamTLS()
        self.groups: dict[str, list[UpstreamEndpoint]] = {}
        self._by_key: dict[tuple[str, str], UpstreamEndpoint] = {}
        self._on_health = on_health
        self._turn = 0

    def sync(self, config: Config) -> None:
        """Create endpoints new in `config`, keep unchanged ones, close removed ones."""
        # TLS first: a config whose files cannot be loaded raises before anything changes
        self.tls.load(config)
        settings = upstream_settings(config)
        wanted: dict[tuple[str, str], UpstreamEndpoint] = {}
        groups: dict[str, list[UpstreamEndpoint]] = {}
        for group in config.groups.values():
            for spec in group.endpoints:
                key = (group.name, str(spec))
                endpoint = self._by_key.get(key)
                if endpoint is None:
                    endpoint = UpstreamEndpoint(
                        group.name,
                        spec,
                        settings,
                        self.tls,
                        config.upstream_tls.server_name,
                        config.health,
                        self._on_health,
                        self.engine.client,
                    )
                    endpoint.loop_lag = self.loop_lag
                    endpoint.start_probing(config.health.interval, config.health.timeout)
                    self._on_health(endpoint, True, "")
                else:
                    endpoint.settings = settings  # for connections opened from now on
                    endpoint.health.policy = config.health
                wanted[key] = endpoint
                groups.setdefault(group.name, []).append(endpoint)
        for members in groups.values():
            for endpoint in members:
                endpoint.peers = members
        for key, endpoint in self._by_key.items():
            if key not in wanted:
                asyncio.get_running_loop().create_task(endpoint.close())
        self._by_key = wanted
        self.groups = groups

    def upgrade_ssl_context(self, spec: Endpoint) -> ssl.SSLContext | None:
        """TLS for Upgrade connections: same trust and client cert, ALPN http/1.1."""
        return self.tls.http1 if spec.scheme == "https" else None

    def pick(self, group: str, exclude: set[UpstreamEndpoint]) -> UpstreamEndpoint | None:
        """Healthy endpoint of `group` with the fewest requests in flight; ties go round
        the group in turn (else sequential requests would all land on the first)."""
        endpoints = self.groups.get(group, ())
        count = len(endpoints)
        if count <= 1:
            only = endpoints[0] if endpoints else None
            return only if only is not None and only.healthy and only not in exclude else None
        self._turn += 1
        best: UpstreamEndpoint | None = None
        for i in range(count):
            endpoint = endpoints[(self._turn + i) % count]
            if not endpoint.healthy or endpoint in exclude:
                continue
            if best is None or endpoint.in_flight < best.in_flight:
                best = endpoint
        return best

    def has_candidates(self, group: str, exclude: set[UpstreamEndpoint]) -> bool:
        return any(e.healthy and e not in exclude for e in self.groups.get(group, ()))

    async def close(self) -> None:
        for endpoint in self._by_key.values():
            await endpoint.close()


class UpstreamTLS:
    """Client TLS for https:// endpoints (ALPN h2 for the pools, http/1.1 for Upgrade):
    the CA that verifies the apiservers and the front-proxy client certificate, re-read
    when their files change. New connections use the newest; open ones keep theirs."""

    def __init__(self) -> None:
        # (pools, upgrades): built together from the same files, re-read once per check
        self._contexts: ReloadingContext[tuple[ssl.SSLContext, ssl.SSLContext]] | None = None

    @property
    def h2(self) -> ssl.SSLContext | None:
        return self._contexts.current[0] if self._contexts else None

    @property
    def http1(self) -> ssl.SSLContext | None:
        return self._contexts.current[1] if self._contexts else None

    def load(self, config: Config) -> None:
        """Build from `config`; ConfigError (and nothing changed) if its files are unusable."""
        if not any(e.scheme == "https" for g in config.groups.values() for e in g.endpoints):
            self._contexts = None
            return
        tls = config.upstream_tls
        paths = (tls.ca_file or "", tls.cert_file or "", tls.key_file or "")
        try:
            contexts = ReloadingContext(
                "upstream.tls",
                paths,
                lambda: (_client_context(tls, "h2"), _client_context(tls, "http/1.1")),
            )
        except (OSError, ssl.SSLError) as exc:
            issues = tls_problems(config, listen=False)
            if issues:
                raise ConfigError(issues, config.source) from None
            raise ConfigError.tls_files("upstream.tls", exc, config.source) from None
        self._contexts = contexts

    def refresh(self) -> bool | None:
        """Certificate rotation: see `ReloadingContext.refresh`."""
        return self._contexts.refresh() if self._contexts else None


def _client_context(tls: UpstreamTLSConfig, alpn: str) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=tls.ca_file)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols([alpn])
    if tls.cert_file and tls.key_file:
        context.load_cert_chain(tls.cert_file, tls.key_file)
    context.sslobject_class = LoopTLSObject  # the loop calls OpenSSL's methods direct
    return context
