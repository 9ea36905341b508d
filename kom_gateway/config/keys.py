"""The YAML's numeric sections: each key, the model field it fills and its bounds (read by
the schema to validate, by the reload log to name a change, by the tests to try each)."""

from __future__ import annotations

from typing import NamedTuple


class Field(NamedTuple):
    """How one numeric YAML key becomes one dataclass field."""

    attr: str
    whole: bool = False  # a whole number
    zero: bool = False  # 0 allowed (meaning "off")
    minimum: float | None = None
    maximum: float | None = None


LIMIT_KEYS: dict[str, Field] = {
    "maxRequestBodyBytes": Field("max_request_body_bytes", whole=True),
    "maxHeaderBytes": Field("max_header_bytes", whole=True),
    "maxStreamsPerConnection": Field("max_streams_per_connection", whole=True),
    "maxConnectionsPerAddress": Field("max_connections_per_address", whole=True, zero=True),
    "tlsHandshakeTimeoutSeconds": Field("tls_handshake_timeout"),
    "headerReadTimeoutSeconds": Field("header_read_timeout"),
    "idleTimeoutSeconds": Field("idle_timeout", zero=True),
    "stalledWriteTimeoutSeconds": Field("stalled_write_timeout", zero=True),
}

TIMEOUT_KEYS: dict[str, Field] = {
    "requestSeconds": Field("request"),
    "connectSeconds": Field("connect"),
}
HEALTH_KEYS: dict[str, Field] = {
    "intervalSeconds": Field("interval"),
    "timeoutSeconds": Field("timeout"),
    "failureThreshold": Field("failure_threshold", whole=True),
    "consecutiveFailures": Field("consecutive_failures", whole=True),
    "baseEjectionSeconds": Field("base_ejection"),
    "maxEjectionSeconds": Field("max_ejection"),
}

_WINDOW = (65535, 2**31 - 1)  # RFC 9113 flow-control window bounds
_FRAME = (16384, 2**24 - 1)  # RFC 9113 SETTINGS_MAX_FRAME_SIZE bounds


_HTTP2_COMMON: dict[str, Field] = {
    "pingIntervalSeconds": Field("ping_interval", zero=True),
    "pingTimeoutSeconds": Field("ping_timeout"),
    "initialStreamWindowBytes": Field("initial_stream_window", True, False, *_WINDOW),
    "connectionWindowBytes": Field("connection_window", True, True, _WINDOW[0], _WINDOW[1]),
    "maxFrameSizeBytes": Field("max_frame_size", True, False, *_FRAME),
    "writeBufferBytes": Field("write_buffer_bytes", True, False, 4096),
}
HTTP2_DOWNSTREAM_KEYS: dict[str, Field] = {
    **_HTTP2_COMMON,
    "maxWriteBacklogBytes": Field("max_write_backlog_bytes", True, False, 65536),
}
HTTP2_UPSTREAM_KEYS: dict[str, Field] = {
    **_HTTP2_COMMON,
    "maxConcurrentStreams": Field("max_concurrent_streams", True, False, 1, 2**31 - 1),
}

OVERLOAD_GROUP_KEYS: dict[str, Field] = {
    "maxInflight": Field("max_inflight", whole=True, zero=True),
    "maxWatches": Field("max_watches", whole=True, zero=True),
    "maxQueueWaitSeconds": Field("max_queue_wait", zero=True, maximum=60),
}
PER_CLIENT_KEYS: dict[str, Field] = {
    "maxInflight": Field("max_inflight", whole=True, zero=True),
    "maxBufferedBytes": Field("max_buffered_bytes", whole=True, zero=True),
    "maxProtectedInflight": Field("max_protected_inflight", whole=True, zero=True),
}
# accessLog's keys -> AccessLogSettings fields (validated one by one in access_log())
ACCESS_LOG_KEYS: dict[str, str] = {
    "enabled": "enabled",
    "path": "path",
    "sampleRate": "sample_rate",
    "alwaysLogErrors": "always_log_errors",
}
GOAWAY_KEYS: dict[str, Field] = {
    "chance": Field("chance", zero=True, maximum=1.0),
    "maxChance": Field("max_chance", zero=True, maximum=1.0),
    "softLoad": Field("soft_load", maximum=0.99),
    "maxConnectionAgeSeconds": Field("max_connection_age", zero=True),
    "maxConnectionAgeJitter": Field("max_connection_age_jitter", zero=True, maximum=1.0),
    "lagBudgetSeconds": Field("lag_budget", zero=True),
    "streamBudget": Field("stream_budget", whole=True, zero=True),
}
