"""`kom-gateway run`: wire config, gateway, listener and admin; reload on SIGHUP;
drain on SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import signal
import ssl
from dataclasses import dataclass

from kom_gateway.config import ConfigError, ConfigHolder, ConfigIssue, load_config_file
from kom_gateway.config.schema import Address
from kom_gateway.http.listener import Listener, server_ssl_context
from kom_gateway.proxy.admin import start_admin
from kom_gateway.proxy.gateway import Gateway

log = logging.getLogger("kom_gateway")


@dataclass
class RunOptions:
    config_path: str
    listen: Address | None = None  # overrides listen.address (port 0: any free port)
    admin: Address | None = None
    drain_seconds: float = 5.0


async def run_gateway(
    options: RunOptions, started: asyncio.Future[tuple[int, int]] | None = None
) -> int:
    config = load_config_file(options.config_path)
    holder = ConfigHolder(config)
    gateway = Gateway(holder)
    ssl_context = None
    if config.listen_tls is not None:
        tls = config.listen_tls
        try:
            ssl_context = server_ssl_context(tls.cert_file, tls.key_file, tls.client_ca_file)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(
                [ConfigIssue("listen.tls", 0, f"cannot load the TLS files: {exc}")],
                options.config_path,
            ) from None
    listener = Listener(gateway.handle, gateway.upgrade, ssl_context=ssl_context)
    listen = options.listen or config.listen
    admin_address = options.admin or config.admin
    port = await listener.start(listen.host, listen.port)
    draining = False

    def is_ready() -> tuple[bool, str]:
        return (not draining, "draining" if draining else "ok")

    runner, admin_port = await start_admin(
        gateway.metrics, admin_address.host, admin_address.port, is_ready
    )
    scheme = "https (h2 + http/1.1 via ALPN)" if ssl_context else "h2c + http/1.1"
    print(
        f"kom-gateway listening on {listen.host}:{port} ({scheme}); admin on "
        f"{admin_address.host}:{admin_port}; config {options.config_path} "
        f"generation {holder.current.generation}",
        flush=True,
    )
    if started is not None:
        started.set_result((port, admin_port))

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGHUP, lambda: gateway.reload(options.config_path))
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    try:
        await stop.wait()
    finally:
        draining = True
        log.info(
            "draining: GOAWAY to HTTP/2 clients, %.0fs for requests in flight",
            options.drain_seconds,
        )
        await listener.close(options.drain_seconds)
        for task in list(gateway.tasks):
            task.cancel()
        await gateway.close()
        await runner.cleanup()
    return 0
