"""The typed configuration the routing YAML becomes (`schema.py` validates the YAML into
it). Plain data: what the data plane reads from one immutable snapshot per request."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

from kom_gateway.http.settings import ConnectionLimits, H2ClientSettings, H2ServerSettings
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


DEFAULT_SESSION_TICKETS = 0  # listen.tls.sessionTickets: Kubernetes clients never resume
MAX_SESSION_TICKETS = 16  # more only costs handshakes


@dataclass(frozen=True)
class ServerTLS:
    cert_file: str
    key_file: str
    client_ca_file: str | None = None
    session_tickets: int = DEFAULT_SESSION_TICKETS  # TLS 1.3 tickets per handshake (tlsfiles.py)


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
    # TCP + TLS + HTTP/2 settings exchange with an apiserver
    connect: float = H2ClientSettings.connect_timeout


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


# The connection sections below are the YAML's shape of the HTTP layer's settings; each
# default is the HTTP layer's own (kom_gateway/http/settings.py, where each setting is
# defined and explained once), and proxy/settings.py maps one onto the other.
_LIMITS, _SERVER, _CLIENT = ConnectionLimits, H2ServerSettings, H2ClientSettings


@dataclass(frozen=True)
class Limits:
    """What one client may take; defaults are kube-apiserver's where it has one."""

    max_request_body_bytes: int = 3 * 1024 * 1024  # kube-apiserver's own cap
    max_header_bytes: int = _LIMITS.max_header_bytes
    max_streams_per_connection: int = _SERVER.max_concurrent_streams
    max_connections_per_address: int = _LIMITS.max_connections_per_address
    tls_handshake_timeout: float = _LIMITS.tls_handshake_timeout
    header_read_timeout: float = _LIMITS.header_read_timeout
    idle_timeout: float = _LIMITS.idle_timeout
    stalled_write_timeout: float = _SERVER.stalled_write_timeout


@dataclass(frozen=True)
class Http2Downstream:
    """HTTP/2 towards clients (streams per connection and idle time are in `limits`)."""

    ping_interval: float = _SERVER.ping_interval
    ping_timeout: float = _SERVER.ping_timeout
    initial_stream_window: int = _SERVER.initial_window
    connection_window: int = _SERVER.connection_window
    max_frame_size: int = _SERVER.max_frame_size
    write_buffer_bytes: int = _SERVER.write_buffer_bytes
    max_write_backlog_bytes: int = _SERVER.max_write_backlog


@dataclass(frozen=True)
class Http2Upstream:
    """HTTP/2 towards apiservers."""

    ping_interval: float = _CLIENT.ping_interval
    ping_timeout: float = _CLIENT.ping_timeout
    max_concurrent_streams: int = _CLIENT.max_concurrent_streams
    initial_stream_window: int = _CLIENT.stream_window
    connection_window: int = _CLIENT.connection_window
    max_frame_size: int = _CLIENT.max_frame_size
    write_buffer_bytes: int = _CLIENT.write_buffer_bytes


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
