"""The typed configuration the routing YAML becomes (`schema.py` validates the YAML into
it). Plain data: what the data plane reads from one immutable snapshot per request."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

from kom_gateway.overload.load import GoawayPolicy
from kom_gateway.overload.policy import OverloadPolicy
from kom_gateway.routing.claims import ResourceClaim
from kom_gateway.routing.cutover import CutoverRule
from kom_gateway.routing.router import Router


class ConfigIssue(NamedTuple):
    path: str  # e.g. "groups.pod.resources[1]"
    line: int  # 1-based; 0 when unknown
    message: str

    def __str__(self) -> str:
        if not self.line and not self.path:  # about the whole file (unreadable, too large)
            return self.message
        where = f"line {self.line}: " if self.line else ""
        return f"{where}{self.path or '(top level)'}: {self.message}"


class ConfigError(Exception):
    """A configuration that must not be served; `issues` lists every problem."""

    def __init__(self, issues: list[ConfigIssue], source: str = "") -> None:
        self.issues = issues
        self.source = source
        super().__init__(self.render())

    @classmethod
    def tls_files(cls, section: str, exc: Exception, source: str) -> ConfigError:
        """TLS files the config names that do not load: refused like any other error."""
        return cls([ConfigIssue(section, 0, f"cannot load the TLS files: {exc}")], source)

    def render(self) -> str:
        prefix = f"{self.source}: " if self.source else ""
        return "\n".join(f"{prefix}{issue}" for issue in self.issues)


class Address(NamedTuple):
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


class Endpoint(NamedTuple):
    scheme: str  # "https" or "http" (h2c, for local/simulated apiservers)
    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"


DEFAULT_LISTEN = Address("127.0.0.1", 8443)
DEFAULT_ADMIN = Address("127.0.0.1", 9090)


@dataclass(frozen=True)
class ServerTLS:
    cert_file: str
    key_file: str
    client_ca_file: str | None = None


@dataclass(frozen=True)
class UpstreamTLS:
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    server_name: str | None = None


@dataclass(frozen=True)
class Group:
    name: str
    endpoints: tuple[Endpoint, ...]
    resources: tuple[ResourceClaim, ...] = ()


@dataclass(frozen=True)
class Timeouts:
    request: float = 60.0  # non-long-running requests (kube-apiserver's default)
    connect: float = 5.0  # TCP + TLS + HTTP/2 settings exchange with an apiserver


@dataclass(frozen=True)
class Health:
    """Active probes (GET /readyz) and passive outlier ejection (what requests see).

    Ejection as Envoy's outlier detection does it (same defaults): `consecutive_failures`
    gateway-visible failures in a row (5xx, reset, timeout, connection error) eject an
    endpoint for `base_ejection` x the number of times it was ejected, at most
    `max_ejection`. A response that breaks after its headers is a failure too (the
    clearest there is). Any success in between starts the run over, so one bad request
    pattern ejects nothing. Unlike Envoy, the last endpoint of a group is ejected too:
    its requests fall back to default, which can answer all of them; only default's own
    last endpoint stays in until its probe fails.
    """

    interval: float = 5.0  # active GET /readyz per endpoint
    timeout: float = 2.0
    failure_threshold: int = 3  # consecutive failed probes that take an endpoint out
    consecutive_failures: int = 5  # consecutive failed requests that eject an endpoint
    base_ejection: float = 30.0
    max_ejection: float = 300.0


@dataclass(frozen=True)
class Limits:
    """What one client may take; defaults are kube-apiserver's where it has one."""

    max_request_body_bytes: int = 3 * 1024 * 1024  # kube-apiserver's own cap
    max_header_bytes: int = 1 << 20  # Go's MaxHeaderBytes as kube-apiserver sets it
    max_streams_per_connection: int = 100  # HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS
    max_connections_per_address: int = 0  # 0: no limit (addresses behind NAT/LB are shared)
    tls_handshake_timeout: float = 10.0
    header_read_timeout: float = 32.0  # kube-apiserver's ReadHeaderTimeout
    idle_timeout: float = 90.0  # kube-apiserver's IdleTimeout (HTTP/1.1 and HTTP/2)
    stalled_write_timeout: float = 120.0  # data waiting on a client that opens no window


@dataclass(frozen=True)
class Http2Downstream:
    """HTTP/2 towards clients (streams per connection and idle time are in `limits`)."""

    ping_interval: float = 30.0  # PING a client silent this long (0: never)
    ping_timeout: float = 15.0  # ...and close it if no ACK comes (client-go's values)
    initial_stream_window: int = 256 * 1024  # request bodies, per stream (kube-apiserver's)
    connection_window: int = 0  # 0: streams x stream window, so no stream starves others
    max_frame_size: int = 256 * 1024  # largest frame we accept (kube-apiserver's)
    write_buffer_bytes: int = 256 * 1024  # socket buffer above which producers pause
    max_write_backlog_bytes: int = 4 << 20  # growth while paused that cuts a client off


@dataclass(frozen=True)
class Http2Upstream:
    """HTTP/2 towards apiservers."""

    ping_interval: float = 30.0
    ping_timeout: float = 15.0
    max_concurrent_streams: int = 100  # ours per connection, also capped by the server's
    initial_stream_window: int = 256 * 1024  # response bytes in flight per stream
    connection_window: int = 0  # 0: streams x stream window
    max_frame_size: int = 256 * 1024
    write_buffer_bytes: int = 256 * 1024


@dataclass(frozen=True)
class AccessLogSettings:
    enabled: bool = False
    path: str = "-"  # "-": standard output
    sample_rate: float = 1.0  # share of requests logged
    always_log_errors: bool = True  # 5xx, 429 and fallbacks whatever the sampling


@dataclass(frozen=True)
class Config:
    groups: Mapping[str, Group]
    cutover: tuple[CutoverRule, ...] = ()
    listen: Address = DEFAULT_LISTEN
    listen_tls: ServerTLS | None = None
    admin: Address = DEFAULT_ADMIN
    upstream_tls: UpstreamTLS = field(default_factory=UpstreamTLS)
    timeouts: Timeouts = field(default_factory=Timeouts)
    health: Health = field(default_factory=Health)
    limits: Limits = field(default_factory=Limits)
    http2_downstream: Http2Downstream = field(default_factory=Http2Downstream)
    http2_upstream: Http2Upstream = field(default_factory=Http2Upstream)
    http2_engine: str = "auto"  # auto | nghttp2 | h2 (see kom_gateway/http/engine.py)
    overload: OverloadPolicy = field(default_factory=OverloadPolicy)
    goaway: GoawayPolicy = field(default_factory=GoawayPolicy)
    access_log: AccessLogSettings = field(default_factory=AccessLogSettings)
    # debug.answeredByHeader, lower-cased: names the group that answered ("" = off)
    answered_by_header: str = ""
    warnings: tuple[ConfigIssue, ...] = ()
    source: str = ""

    def router(self) -> Router:
        claims = [(c, g.name) for g in self.groups.values() for c in g.resources]
        return Router(claims, self.cutover)
