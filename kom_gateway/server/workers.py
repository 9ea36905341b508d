"""`kom-gateway run --workers N`: N gateway processes on one port, and a supervisor.

Each worker is an ordinary `kom-gateway run` with the same config, serving on a listening
socket of its own bound with SO_REUSEPORT, so the kernel spreads new connections over the
workers. The supervisor binds those sockets and keeps them: a worker restarted after a
crash serves on the same socket (the connections queued there are not lost), and with
`--reuse-port` a replacement supervisor is handed all of them (server/handover.py) and
its workers serve on them, as one process hands over its own. A worker imports
the very package the supervisor runs (`WORKER_BOOT`), not whatever `python -m` would
find first in the current directory: a source checkout there would run uncompiled, and
a planted `kom_gateway/` would run instead of the gateway. Workers write
their metrics to files (prometheus-client's multiprocess mode) and the supervisor's
admin port serves them combined. SIGHUP and SIGTERM are passed on to every worker (each
reloads or drains itself); a worker that dies is restarted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile

from prometheus_client import CollectorRegistry
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

from kom_gateway import compiled
from kom_gateway.config import load_config_file
from kom_gateway.proxy.metrics import MULTIPROC_ENV
from kom_gateway.server import admin as admin_port
from kom_gateway.server.admin import start_admin
from kom_gateway.server.bind import listening_socket
from kom_gateway.server.handover import (
    HandoverServer,
    claim_serving,
    take_over,
    until_replaced,
)
from kom_gateway.server.run import RunOptions

log = logging.getLogger("kom_gateway.workers")

READY_LINE = "kom-gateway listening on"
# `python -P -c WORKER_BOOT ROOT ARGS...`: -P keeps the current directory off sys.path;
# ROOT (the directory holding the supervisor's package) goes first when the package
# would otherwise be found elsewhere.
WORKER_BOOT = """\
import importlib.util, os, sys
root = sys.argv.pop(1)
spec = importlib.util.find_spec("kom_gateway")
if spec is None or os.path.dirname(os.path.dirname(os.path.realpath(spec.origin))) != root:
    sys.path.insert(0, root)
from kom_gateway.cli import main
sys.exit(main())
"""
START_TIMEOUT = 30.0
RESTART_PAUSE = 1.0


class Worker:
    def __init__(
        self, index: int, argv: list[str], env: dict[str, str], sock: socket.socket
    ) -> None:
        self.index = index
        self.sock = sock  # its listening socket, the supervisor's for good
        self.argv = [*argv, "--listen-fd", str(sock.fileno())]
        self.env = env
        self.proc: asyncio.subprocess.Process | None = None
        self.scheme = ""
        self._output: asyncio.Task[None] | None = None  # held: the loop keeps tasks weakly

    async def start(self) -> None:
        """Start the process and wait until it listens."""
        self.proc = await asyncio.create_subprocess_exec(
            *self.argv,
            stdout=asyncio.subprocess.PIPE,
            env=self.env,
            pass_fds=(self.sock.fileno(),),
        )
        assert self.proc.stdout is not None
        async with asyncio.timeout(START_TIMEOUT):
            while True:
                line = (await self.proc.stdout.readline()).decode()
                if not line:
                    raise RuntimeError(f"worker {self.index} exited before listening")
                if READY_LINE in line:
                    # "... on H:P (SCHEME); no admin port ...": SCHEME may hold parentheses
                    self.scheme = line.split(" (", 1)[-1].split("); ", 1)[0]
                    break
                print(line, end="", flush=True)
        self._output = asyncio.get_running_loop().create_task(self._forward_output())

    async def _forward_output(self) -> None:
        """The worker's standard output (the access log, when it goes there), passed on
        line by line, unchanged: JSON lines must stay JSON lines."""
        assert self.proc is not None and self.proc.stdout is not None
        out = sys.stdout.buffer
        async for line in self.proc.stdout:
            out.write(line)
            out.flush()

    def signal(self, signum: int) -> None:
        if self.proc is not None and self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signum)

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None


async def run_workers(options: RunOptions, count: int, log_level: str = "info") -> int:
    config = load_config_file(options.config_path)  # a bad config fails here, once
    listen = options.listen or config.listen
    admin = options.admin or config.admin
    metrics_dir = tempfile.mkdtemp(prefix="kom-gateway-metrics-")
    handing_over = options.reuse_port and options.handover
    # a running instance on our port (the one this replaces) hands us its sockets
    inherited = take_over(listen.host, listen.port) if handing_over and listen.port else None
    offered = inherited.sockets if inherited is not None else {}
    sockets: list[socket.socket] = []
    for i, sock in enumerate(claim_serving(offered, count)):
        if sock is None:  # all on one port: the first one bound decides it (port 0)
            sock = listening_socket(listen.host, sockets[0].getsockname()[1] if i else listen.port)
        sockets.append(sock)
    port = sockets[0].getsockname()[1]
    host = f"[{listen.host}]" if ":" in listen.host else listen.host
    argv = [
        sys.executable,
        "-P",
        "-c",
        WORKER_BOOT,
        os.path.realpath(compiled.ROOT),
        "run",
        "--config",
        options.config_path,
        "--listen",
        f"{host}:{port}",
        "--reuse-port",
        "--no-handover",
        "--no-admin",
        "--drain-seconds",
        str(options.drain_seconds),
        "--shutdown-delay",
        str(options.shutdown_delay),
        "--watch-interval",
        str(options.watch_seconds),
        "--log-level",
        log_level,
        *(("--engine", options.engine) if options.engine else ()),
    ]
    env = {**os.environ, MULTIPROC_ENV: metrics_dir}
    workers = [Worker(i, argv, env, sock) for i, sock in enumerate(sockets)]
    runner = None
    handover: HandoverServer | None = None
    try:
        await asyncio.gather(*(w.start() for w in workers))
        for worker in workers:
            _report(worker)
        stopping = False

        def is_ready() -> tuple[bool, str]:
            if stopping:
                return False, "draining"
            alive = sum(w.alive for w in workers)
            return alive == count, f"{alive}/{count} workers"

        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=metrics_dir)
        runner, bound_admin = await start_admin(
            registry,
            admin.host,
            admin.port,
            is_ready,
            reuse_port=options.reuse_port,
            sock=offered.pop("admin", None),
        )
        if handing_over:
            roles = {f"serving-{w.index}": w.sock for w in workers}
            admin_sock = admin_port.admin_socket(runner)
            if admin_sock is not None:
                roles["admin"] = admin_sock
            handover = HandoverServer(roles)
            handover.start(listen.host, port)
        if inherited is not None:
            inherited.confirm()
            log.info("serving on the listening sockets of pid %d, which this replaces",
                     inherited.pid)  # fmt: skip
        print(
            f"{READY_LINE} {host}:{port} ({workers[0].scheme}, {count} workers); admin on "
            f"{admin.host}:{bound_admin}; config {options.config_path}",
            flush=True,
        )
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()

        def reload_all() -> None:
            for worker in workers:
                worker.signal(signal.SIGHUP)

        loop.add_signal_handler(signal.SIGHUP, reload_all)
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_signal_handler(signal.SIGINT, stop.set)
        supervisors = [loop.create_task(_supervise(w, metrics_dir)) for w in workers]
        await stop.wait()
        stopping = True
        for task in supervisors:
            task.cancel()
        if options.reuse_port:  # the workers keep accepting until a replacement serves
            await until_replaced(handover, port, options.drain_seconds, own=count)
        if handover is not None:
            handover.close()
            if handover.taken.is_set():
                await admin_port.stop_accepting(runner)  # /readyz is the replacement's now
        for worker in workers:
            worker.signal(signal.SIGTERM)
        grace = options.shutdown_delay + options.drain_seconds + 10.0
        await _wait_all(workers, grace)
        return 0
    finally:
        for worker in workers:
            worker.signal(signal.SIGKILL)
        await _wait_all(workers, 5.0)
        if runner is not None:
            await runner.cleanup()
        for sock in sockets:
            sock.close()
        shutil.rmtree(metrics_dir, ignore_errors=True)


async def _supervise(worker: Worker, metrics_dir: str) -> None:
    """Restart the worker whenever it exits (we are cancelled on shutdown first)."""
    while True:
        assert worker.proc is not None
        code = await worker.proc.wait()
        mark_process_dead(worker.proc.pid, metrics_dir)
        log.error("worker %d (pid %d) exited with %s: restarting", worker.index,
                  worker.proc.pid, code)  # fmt: skip
        await asyncio.sleep(RESTART_PAUSE)
        try:
            await worker.start()
        except (RuntimeError, TimeoutError, OSError) as exc:
            log.error("worker %d did not restart: %s", worker.index, exc)
        else:
            _report(worker)


def _report(worker: Worker) -> None:
    """Say what a worker runs; warn when its core is not the supervisor's."""
    assert worker.proc is not None
    print(f"worker {worker.index} (pid {worker.proc.pid}): {worker.scheme}", flush=True)
    own = f"core {compiled.core()}"
    if not worker.scheme.endswith(own):
        log.warning("worker %d does not run the supervisor's %s: %s", worker.index, own,
                    worker.scheme)  # fmt: skip


async def _wait_all(workers: list[Worker], timeout: float) -> None:
    procs = [w.proc for w in workers if w.proc is not None and w.proc.returncode is None]
    if procs:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await asyncio.gather(*(p.wait() for p in procs))
