"""Admin endpoints: /metrics (Prometheus), /healthz (alive), /readyz (taking traffic)."""

from __future__ import annotations

import socket
from collections.abc import Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from kom_gateway import compat
from kom_gateway.server.bind import BindError


async def start_admin(
    registry: CollectorRegistry,
    host: str,
    port: int,
    is_ready: Callable[[], tuple[bool, str]],
    before_scrape: Callable[[], None] = lambda: None,
    reuse_port: bool = False,
    sock: socket.socket | None = None,
) -> tuple[web.AppRunner, int]:
    """Serve the admin endpoints. With `reuse_port`, a replacement instance binds the same
    port while this one drains (each answers /readyz for itself); `sock`: a listening
    socket handed over by the instance this one replaces."""

    async def metrics_handler(request: web.Request) -> web.Response:
        before_scrape()  # batched counters reach prometheus-client first
        body = generate_latest(registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def healthz(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def readyz(request: web.Request) -> web.Response:
        ready, detail = is_ready()
        return web.Response(status=200 if ready else 503, text=detail)

    app = web.Application()
    app.router.add_get("/metrics", metrics_handler)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/livez", healthz)
    app.router.add_get("/readyz", readyz)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site: web.BaseSite
    if sock is not None:
        site = web.SockSite(runner, sock)
    else:
        site = web.TCPSite(runner, host, port, reuse_address=True, reuse_port=reuse_port or None)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise BindError("admin", host, port, exc, "--admin / admin.address") from None
    sock = admin_socket(runner)
    assert sock is not None
    return runner, int(sock.getsockname()[1])


def admin_socket(runner: web.AppRunner) -> socket.socket | None:
    """The admin port's listening socket (to hand to a replacement)."""
    for site in runner.sites:
        sockets = compat.site_sockets(site)
        if sockets:
            return sockets[0]
    return None


async def stop_accepting(runner: web.AppRunner) -> None:
    """Close the admin port's listening socket (one handed over lives on there), leaving
    the connections already open."""
    for site in list(runner.sites):
        await site.stop()
