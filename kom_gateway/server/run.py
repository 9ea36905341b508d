"""`kom-gateway run`: wire config, gateway, listener and admin; reload on SIGHUP and
when the config file changes; drain on SIGTERM."""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass

from aiohttp import web

from kom_gateway import compiled
from kom_gateway.config import ConfigError, ConfigHolder, load_config_file
from kom_gateway.config.model import AccessLogSettings, Address
from kom_gateway.config.tlscheck import tls_problems
from kom_gateway.http.listener import Listener
from kom_gateway.http.serverconn import GOAWAY_LINGER_SECONDS
from kom_gateway.proxy.gateway import Gateway
from kom_gateway.proxy.settings import listener_settings
from kom_gateway.server import admin
from kom_gateway.server.filewatch import FileSet
from kom_gateway.server.handover import (
    HandoverServer,
    claim_serving,
    take_over,
    until_replaced,
)
from kom_gateway.server.memtrim import MemoryTrimmer
from kom_gateway.server.tlsfiles import ServerTLSContext

log = logging.getLogger("kom_gateway")
GC_YOUNG_THRESHOLD = 10_000  # net allocations between collections of the youngest generation


@dataclass
class RunOptions:
    config_path: str
    listen: Address | None = None  # overrides listen.address (port 0: any free port)
    admin: Address | None = None
    drain_seconds: float = 5.0  # SIGTERM: how long requests in flight may take to finish
    shutdown_delay: float = 0.0  # SIGTERM: report unready this long before draining
    watch_seconds: float = 5.0  # how often the config and certificate files are checked
    reuse_port: bool = False  # SO_REUSEPORT: several instances or workers on one port
    handover: bool = True  # with reuse_port: take/hand over the listening sockets
    serve_admin: bool = True  # False in workers: the supervisor serves /metrics
    engine: str | None = None  # HTTP/2 engine (auto | nghttp2 | h2); None: the config's
    access_log: str | None = None  # log every request here, whatever accessLog says (the demo)
    listen_fd: int | None = None  # a listening socket to serve on (a worker's, inherited)


async def run_gateway(
    options: RunOptions, started: asyncio.Future[tuple[int, int]] | None = None
) -> int:
    if (warning := compiled.start_warning()) is not None:
        log.warning(warning)
    config = load_config_file(options.config_path)
    holder = ConfigHolder(config)
    flags = {
        "listen.address": "--listen" if options.listen else "",
        "admin.address": "--admin" if options.admin else "",
        "http2.engine": "--engine" if options.engine else "",
        "accessLog": "the demo's own access log" if options.access_log else "",
    }
    gateway = Gateway(
        holder,
        engine=options.engine,
        overridden={k: v for k, v in flags.items() if v},
        access_log=AccessLogSettings(True, options.access_log) if options.access_log else None,
    )
    serving_tls = None
    if config.listen_tls is not None:
        tls = config.listen_tls
        try:
            serving_tls = ServerTLSContext(
                tls.cert_file, tls.key_file, tls.client_ca_file, tls.session_tickets
            )
        except (OSError, ssl.SSLError) as exc:
            issues = tls_problems(config, upstream=False)
            if issues:
                raise ConfigError(issues, options.config_path) from None
            raise ConfigError.tls_files("listen.tls", exc, options.config_path) from None
    listener = new_listener(gateway, serving_tls.listening if serving_tls else None)
    listen = options.listen or config.listen
    handing_over = options.reuse_port and options.handover
    # a running instance on our port (the one this replaces) hands us its sockets
    inherited = take_over(listen.host, listen.port) if handing_over else None
    sockets = inherited.sockets if inherited is not None else {}
    if options.listen_fd is not None:
        sockets["serving"] = socket.socket(fileno=options.listen_fd)
    port = await listener.start(
        listen.host, listen.port, options.reuse_port, sock=claim_serving(sockets, 1)[0]
    )
    gateway.start_load_sampling(listener.open_streams)
    draining = False

    def is_ready() -> tuple[bool, str]:
        return (not draining, "draining" if draining else "ok")

    runner = None
    admin_text = "no admin port (a worker)"
    admin_port = 0
    if options.serve_admin:
        admin_address = options.admin or config.admin
        runner, admin_port = await admin.start_admin(
            gateway.metrics.registry,
            admin_address.host,
            admin_address.port,
            is_ready,
            gateway.metrics.flush,
            reuse_port=options.reuse_port,
            sock=sockets.get("admin"),
        )
        admin_text = f"admin on {admin_address.host}:{admin_port}"
    elif "admin" in sockets:
        sockets["admin"].close()
    handover = _serve_handover(listener, runner, listen.host, port) if handing_over else None
    if inherited is not None:
        inherited.confirm()
        log.info("serving on the listening sockets of pid %d, which this replaces", inherited.pid)
    scheme = "https: h2 + http/1.1 via ALPN" if serving_tls else "h2c + http/1.1"
    scheme += f", HTTP/2 engine {gateway.engine.name}, core {compiled.core()}"
    print(
        f"kom-gateway listening on {listen.host}:{port} ({scheme}); {admin_text}; "
        f"config {options.config_path} generation {holder.current.generation}",
        flush=True,
    )
    if started is not None:
        started.set_result((port, admin_port))
    # Everything allocated so far (modules, config, pools) lives as long as the process:
    # out of the collector's sight, the collections that allocation churn still triggers
    # stay small (about 3 µs less CPU per proxied request; see bench/README.md). A request
    # leaves no cycles behind (tested), so the youngest generation is collected every
    # 10,000 net allocations instead of 700: by then most of a request's objects are
    # freed, and collections stop costing ~3% of the CPU.
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, 10, 10)

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    config_file = FileSet((options.config_path,))

    async def reload_now() -> None:
        if (await gateway.reload(options.config_path)).applied:
            listener.set_limits(*listener_settings(gateway.holder.current.config))

    reloads: set[asyncio.Task[None]] = set()  # held: the loop keeps tasks weakly

    def reload() -> None:
        config_file.changed()  # this read is the one applied: the watcher need not repeat it
        task = loop.create_task(reload_now())
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    loop.add_signal_handler(signal.SIGHUP, reload)
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    watcher = loop.create_task(
        _watch_files(gateway, serving_tls, config_file, reload, options.watch_seconds)
    )
    try:
        await stop.wait()
    finally:
        watcher.cancel()
        draining = True
        await drain(gateway, listener, options, handover, runner)
        gateway.abort_all()
        await gateway.close()
        if runner is not None:
            await runner.cleanup()
    return 0


def _serve_handover(
    listener: Listener, runner: web.AppRunner | None, host: str, port: int
) -> HandoverServer:
    """Offer our listening sockets to the instance that will replace this one."""
    sockets = {"serving": listener.listening_socket}
    if runner is not None:
        sockets["admin"] = admin.admin_socket(runner)
    handover = HandoverServer({role: s for role, s in sockets.items() if s is not None})
    handover.start(host, port)
    return handover


async def drain(
    gateway: Gateway,
    listener: Listener,
    options: RunOptions,
    handover: HandoverServer | None = None,
    runner: web.AppRunner | None = None,
) -> None:
    """SIGTERM, in order: unready for `shutdown_delay` (load balancers take the replica
    out); stop accepting (SO_REUSEPORT peers get the new connections); graceful GOAWAY to
    every HTTP/2 client; requests in flight get `drain_seconds` to finish; watches are
    ended cleanly (clients re-watch elsewhere); connections close once empty. With
    --reuse-port, accepting stops only once a replacement started with the same command
    serves on our listening sockets (handed over: not one queued connection is lost) or
    listens on the port with its own (at most `drain_seconds` later)."""
    if options.shutdown_delay > 0:
        log.info("shutting down: unready for %.0fs before draining", options.shutdown_delay)
        await asyncio.sleep(options.shutdown_delay)
    if options.reuse_port and listener.port:
        await until_replaced(handover, listener.port, options.drain_seconds)
    if handover is not None:
        handover.close()
        if handover.taken.is_set() and runner is not None:
            await admin.stop_accepting(runner)  # its /readyz is the replacement's now
    log.info(
        "draining: GOAWAY to HTTP/2 clients, %.0fs for requests in flight", options.drain_seconds
    )
    # the connections queued on our socket are ours to serve unless a replacement was
    # handed it (then they are the replacement's); closing it would reset them
    listener.stop_accepting(take_queued=handover is None or not handover.taken.is_set())
    listener.goaway_all("drain")
    await gateway.drain(options.drain_seconds)
    await listener.close(GOAWAY_LINGER_SECONDS + 1.0)


def new_listener(gateway: Gateway, ssl_context: ssl.SSLContext | None) -> Listener:
    """The client-facing listener of `gateway`, its limits and metrics wired."""
    limits, h2_settings = listener_settings(gateway.holder.current.config)
    metrics = gateway.metrics
    listener = Listener(
        gateway.intake.handle,
        None,  # Upgrade requests are streams too: the intake carries them
        h2_settings,
        ssl_context,
        limits,
        on_reject=lambda reason: metrics.connections_rejected.labels(reason).inc(),
        on_abuse=lambda kind: metrics.http2_abuse.labels(kind).inc(),
        on_goaway=lambda reason: metrics.goaways.labels(reason).inc(),
        engine=gateway.engine,
    )
    h2 = metrics.client_connections.labels("h2")
    h1 = metrics.client_connections.labels("http/1.1")
    handshaking = metrics.client_connections.labels("tls-handshake")

    def count_connections() -> None:
        h2.set(len(listener.h2_connections))
        h1.set(listener.h1_connections)
        handshaking.set(listener.handshaking)

    metrics.samplers.append(count_connections)
    return listener


async def _watch_files(
    gateway: Gateway,
    serving_tls: ServerTLSContext | None,
    config_file: FileSet,
    reload: Callable[[], None],
    interval: float,
) -> None:
    """Every `interval`: reload the config if its file changed (an edit, or a ConfigMap
    volume's symlink swap), re-read serving and upstream TLS files that changed, and
    give memory freed after a burst back to the OS (server/memtrim.py)."""
    trimmer = MemoryTrimmer()
    while True:
        await asyncio.sleep(interval)
        trimmer.maybe_trim()
        if config_file.changed():
            log.info("%s changed on disk: reloading", config_file.paths[0])
            reload()
        for outcome, side in (
            (serving_tls.refresh() if serving_tls else None, "listen"),
            (gateway.upstreams.tls.refresh(), "upstream"),
        ):
            if outcome is not None:
                gateway.metrics.tls_reloads.labels(side, "applied" if outcome else "rejected").inc()
