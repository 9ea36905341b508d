"""Connection settings of both sides, shared by every engine, and the one source of
their defaults: the YAML's `limits`, `http2.downstream` and `http2.upstream` default to
these (`config/schema.py`) and are translated into them in one place
(`proxy/settings.py`). Defaults are kube-apiserver's and client-go's where they have one."""

from __future__ import annotations

from dataclasses import dataclass, field

from kom_gateway.http.guard import GuardLimits

HTTP2_ENGINES = ("auto", "nghttp2", "h2")  # `http2.engine`, `--engine` (see engine.py)
# Header fields both engines send as never-indexed HPACK literals (RFC 7541 7.1.3):
# credentials must not sit in a compression table an attacker could probe.
NEVER_INDEXED = frozenset({b"authorization", b"proxy-authorization", b"cookie"})


@dataclass(frozen=True)
class ConnectionLimits:
    """Client connections, whatever protocol they speak."""

    max_connections_per_address: int = 0  # 0: no limit
    tls_handshake_timeout: float = 10.0
    header_read_timeout: float = 32.0  # kube-apiserver's ReadHeaderTimeout
    idle_timeout: float = 90.0  # kube-apiserver's IdleTimeout (HTTP/1.1 and HTTP/2)
    max_header_bytes: int = 1 << 20  # Go's MaxHeaderBytes as kube-apiserver sets it


@dataclass(frozen=True)
class H2ServerSettings:
    max_concurrent_streams: int = 100  # kube-apiserver's default since the rapid-reset fixes
    initial_window: int = 256 * 1024  # per stream, for request bodies (kube-apiserver's)
    max_frame_size: int = 256 * 1024  # largest frame we accept (kube-apiserver's)
    max_header_list_size: int = ConnectionLimits.max_header_bytes
    ping_interval: float = 30.0  # PING a client silent this long (0: never)
    ping_timeout: float = 15.0  # ...and close its connection if it does not answer
    idle_timeout: float = ConnectionLimits.idle_timeout  # no open stream: GOAWAY and close
    stalled_write_timeout: float = 120.0  # data waits, client opens no window: close
    max_write_backlog: int = 4 << 20  # bytes queued while paused (ACKs, RSTs: no DATA)
    connection_window: int = 0  # 0: streams x stream window
    write_buffer_bytes: int = 256 * 1024  # transport buffer above which producers pause
    max_connection_age: float = 0.0  # GOAWAY a connection this old (0: never)
    max_connection_age_jitter: float = 0.1  # +/- share, so connections do not expire together
    # (the YAML's goaway.maxConnectionAge*: overload/load.py's GoawayPolicy takes these)
    guard: GuardLimits = field(default_factory=GuardLimits)


@dataclass(frozen=True)
class H2ClientSettings:
    stream_window: int = 256 * 1024
    max_concurrent_streams: int = 100  # ours per connection (kube-apiserver allows 100)
    max_frame_size: int = 256 * 1024
    connect_timeout: float = 5.0
    ping_interval: float = 30.0  # as client-go: PING after 30 s of silence
    ping_timeout: float = 15.0
    connection_window: int = 0  # 0: streams x stream window, so no stream starves others
    write_buffer_bytes: int = 256 * 1024
