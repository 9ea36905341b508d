"""Admin endpoints: /metrics (Prometheus), /healthz (alive), /readyz (taking traffic)."""

from __future__ import annotations

from collections.abc import Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest


async def start_admin(
    registry: CollectorRegistry,
    host: str,
    port: int,
    is_ready: Callable[[], tuple[bool, str]],
    before_scrape: Callable[[], None] = lambda: None,
) -> tuple[web.AppRunner, int]:
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
    site = web.TCPSite(runner, host, port, reuse_address=True)
    await site.start()
    server = site._server
    assert server is not None
    return runner, int(server.sockets[0].getsockname()[1])  # type: ignore[attr-defined]
