"""HTTP/2 settings of both sides, shared by every engine (the YAML's `http2.downstream`
and `http2.upstream` land here)."""

from __future__ import annotations

from dataclasses import dataclass, field

from kom_gateway.http.h2guard import GuardLimits


@dataclass(frozen=True)
class H2ServerSettings:
    max_concurrent_streams: int = 100  # kube-apiserver's default since the rapid-reset fixes
    initial_window: int = 256 * 1024  # per stream, for request bodies
    max_frame_size: int = 16384
    max_header_list_size: int = 1 << 20  # kube-apiserver's 1 MiB
    ping_interval: float = 30.0  # PING a client silent this long (0: never)
    ping_timeout: float = 15.0  # ...and close its connection if it does not answer
    idle_timeout: float = 90.0  # no open stream this long: GOAWAY and close (kube-apiserver's)
    stalled_write_timeout: float = 120.0  # data waits, client opens no window: close
    max_write_backlog: int = 4 << 20  # bytes queued while paused (ACKs, RSTs: no DATA)
    connection_window: int = 0  # 0: streams x stream window
    write_buffer_bytes: int = 256 * 1024  # transport buffer above which producers pause
    max_connection_age: float = 0.0  # GOAWAY a connection this old (0: never)
    max_connection_age_jitter: float = 0.1  # +/- share, so connections do not expire together
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
