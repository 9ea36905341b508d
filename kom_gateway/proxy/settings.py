"""The config's connection sections, translated once into the HTTP layer's settings
(whose defaults they share: `http/settings.py`)."""

from __future__ import annotations

from kom_gateway.config.model import Config
from kom_gateway.http.settings import ConnectionLimits, H2ClientSettings, H2ServerSettings


def listener_settings(config: Config) -> tuple[ConnectionLimits, H2ServerSettings]:
    """The client-facing limits of `config`, as the HTTP layer takes them."""
    limits = config.limits
    h2 = config.http2_downstream
    return (
        ConnectionLimits(
            limits.max_connections_per_address,
            limits.tls_handshake_timeout,
            limits.header_read_timeout,
            limits.idle_timeout,
            limits.max_header_bytes,
        ),
        H2ServerSettings(
            max_concurrent_streams=limits.max_streams_per_connection,
            initial_window=h2.initial_stream_window,
            max_frame_size=h2.max_frame_size,
            max_header_list_size=limits.max_header_bytes,
            ping_interval=h2.ping_interval,
            ping_timeout=h2.ping_timeout,
            idle_timeout=limits.idle_timeout,
            stalled_write_timeout=limits.stalled_write_timeout,
            max_write_backlog=h2.max_write_backlog_bytes,
            connection_window=h2.connection_window,
            write_buffer_bytes=h2.write_buffer_bytes,
            max_connection_age=config.goaway.max_connection_age,
            max_connection_age_jitter=config.goaway.max_connection_age_jitter,
        ),
    )


def upstream_settings(config: Config) -> H2ClientSettings:
    """Towards the apiservers: `http2.upstream` and `timeouts.connect`."""
    h2 = config.http2_upstream
    return H2ClientSettings(
        stream_window=h2.initial_stream_window,
        max_concurrent_streams=h2.max_concurrent_streams,
        max_frame_size=h2.max_frame_size,
        connect_timeout=config.timeouts.connect,
        ping_interval=h2.ping_interval,
        ping_timeout=h2.ping_timeout,
        connection_window=h2.connection_window,
        write_buffer_bytes=h2.write_buffer_bytes,
    )
