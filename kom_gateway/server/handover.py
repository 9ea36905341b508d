"""Handing the listening sockets over to a replacement (restart in place, `--reuse-port`).

A replacement started with the same command asks the running instance for its listening
sockets over a Unix socket and serves on those very sockets, as HAProxy's seamless
reload and Envoy's hot restart do. Nothing is closed in between: connections already
queued on the socket (accepted by the kernel, not yet by the old process) are accepted by
the new one, where a socket of its own would have left them to die with the old one's
(connection resets under a new-connection-per-request load).

The exchange, on the abstract Unix socket named after the serving address (Linux; no
file to clean up, gone with its process; each side talks only to a peer of its own user,
or root):

    new -> old   b"take\\n"
    old -> new   {"pid": ..., "roles": ["serving", "admin"]} + those fds (SCM_RIGHTS);
                 a `--workers N` supervisor's roles are serving-0 .. serving-N-1, admin
    new -> old   b"ok\\n", once it serves on them (else the old one keeps them alone)

The old instance then gives up the name (the new one takes it for the next restart) and,
once told to stop (SIGTERM), stops accepting at once: its fds close, the sockets live on
in the new process. Without the exchange (another OS, port 0, a replacement that does not
ask), the old instance keeps accepting until another socket listens on its port, as read
from the kernel's tables (`others_listening`), then closes its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import struct
import sys
from collections.abc import Mapping
from pathlib import Path

log = logging.getLogger(__name__)

LISTEN = "0A"  # TCP_LISTEN in /proc/net/tcp's `st` column
TABLES = (Path("/proc/net/tcp"), Path("/proc/net/tcp6"))
SUPPORTED = sys.platform.startswith("linux")  # abstract Unix sockets, SO_PEERCRED
TAKE, OK = b"take\n", b"ok\n"
ASK_TIMEOUT = 2.0  # the new instance waits this long for the old one's answer
CONFIRM_TIMEOUT = 30.0  # the old one waits this long for "ok" before keeping its sockets


def peer_credentials(conn: socket.socket) -> tuple[int, int]:
    """(pid, uid) of the process at the other end of a Unix socket."""
    pid, uid, _gid = struct.unpack(
        "3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    )
    return pid, uid


def handover_name(host: str, port: int) -> str:
    """The abstract socket an instance serving on host:port answers on."""
    return f"\0kom-gateway/handover/{host}:{port}"


class Inherited:
    """Listening sockets received from the instance being replaced; `confirm()` once
    serving on them."""

    def __init__(self, conn: socket.socket, pid: int, sockets: dict[str, socket.socket]) -> None:
        self._conn = conn
        self.pid = pid
        self.sockets = sockets

    def confirm(self) -> None:
        with contextlib.suppress(OSError):
            self._conn.sendall(OK)
        self._conn.close()


def take_over(host: str, port: int) -> Inherited | None:
    """The listening sockets of a running instance serving on host:port, or None when
    there is none to ask (or it would not hand them over). Blocks at most ASK_TIMEOUT."""
    if not SUPPORTED or port == 0:
        return None
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.settimeout(ASK_TIMEOUT)
    try:
        conn.connect(handover_name(host, port))
        _pid, uid = peer_credentials(conn)
        if uid not in (os.getuid(), 0):  # a squatter on the name: not our predecessor
            log.warning("the handover socket for port %d belongs to uid %d: ignored", port, uid)
            conn.close()
            return None
        conn.sendall(TAKE)
        message, fds, _flags, _addr = socket.recv_fds(conn, 4096, 8)
    except OSError:
        conn.close()
        return None
    received: list[socket.socket] = []
    for fd in fds:
        try:
            received.append(socket.socket(fileno=fd))
        except OSError:
            os.close(fd)
    try:
        info = json.loads(message)
        roles = info["roles"]
        if len(roles) != len(received):
            raise ValueError(f"{len(fds)} descriptors for roles {roles}")
        sockets = dict(zip(roles, received, strict=True))
        serving = sockets.get("serving") or sockets.get("serving-0")  # (a supervisor's)
        if serving is None or serving.getsockname()[1] != port:
            raise ValueError("no listening socket on the port")
        return Inherited(conn, int(info["pid"]), sockets)
    except (ValueError, KeyError, TypeError, OSError) as exc:
        log.warning("the instance on port %d offered unusable sockets (%s): binding anew",
                    port, exc)  # fmt: skip
        for sock in received:
            sock.close()
        conn.close()
        return None


class HandoverServer:
    """Answers a replacement's request for this instance's listening sockets."""

    def __init__(self, sockets: Mapping[str, socket.socket]) -> None:
        self._sockets = dict(sockets)
        self.taken = asyncio.Event()  # a replacement serves on our sockets
        self.taker = 0  # its pid
        self._server: socket.socket | None = None
        self._task: asyncio.Task[None] | None = None

    def start(self, host: str, port: int) -> None:
        if SUPPORTED and port:
            self._task = asyncio.get_running_loop().create_task(self._run(host, port))

    async def _run(self, host: str, port: int) -> None:
        loop = asyncio.get_running_loop()
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        server.setblocking(False)
        # the instance this one replaced may hold the name for a moment more
        while True:
            try:
                server.bind(handover_name(host, port))
                break
            except OSError:
                await asyncio.sleep(0.05)
        server.listen(4)
        self._server = server
        while not self.taken.is_set():
            conn, _ = await loop.sock_accept(server)
            with conn:
                try:
                    await self._answer(loop, conn)
                except (OSError, TimeoutError) as exc:
                    log.warning("handing the listening sockets over failed: %s", exc)
        self._release()

    async def _answer(self, loop: asyncio.AbstractEventLoop, conn: socket.socket) -> None:
        pid, uid = peer_credentials(conn)
        if uid not in (os.getuid(), 0):
            log.warning("refused to hand the listening sockets to pid %d of uid %d", pid, uid)
            return
        async with asyncio.timeout(ASK_TIMEOUT):
            if await loop.sock_recv(conn, len(TAKE)) != TAKE:
                return
        roles = list(self._sockets)
        message = json.dumps({"pid": os.getpid(), "roles": roles}).encode()
        conn.setblocking(True)  # a few bytes and fds: never blocks in practice
        socket.send_fds(conn, [message], [self._sockets[r].fileno() for r in roles])
        conn.setblocking(False)
        async with asyncio.timeout(CONFIRM_TIMEOUT):
            confirmed = await loop.sock_recv(conn, len(OK)) == OK
        if confirmed:
            self.taker = pid
            self.taken.set()
            log.info("pid %d took over the listening sockets", pid)

    def _release(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        self._release()


def claim_serving(sockets: dict[str, socket.socket], count: int) -> list[socket.socket | None]:
    """The handed-over listening sockets for `count` serving processes, taken out of
    `sockets` in order: a supervisor's `serving-<i>`, or a single instance's `serving` as
    the first; None where none was handed over. Any left over is closed (connections
    queued there are reset: fewer processes serve now)."""
    claimed = [sockets.pop(f"serving-{i}", None) for i in range(count)]
    if claimed[0] is None:
        claimed[0] = sockets.pop("serving", None)
    for role in [r for r in sockets if r.startswith("serving")]:
        log.warning("closing the handed-over listening socket %s: %d serving now", role, count)
        sockets.pop(role).close()
    return claimed


async def until_replaced(
    handover: HandoverServer | None, port: int, limit: float, own: int = 1
) -> None:
    """Keep accepting until a replacement serves on our sockets (handed over) or on its
    own (beyond our `own` ones), at most `limit` seconds: no client finds the port closed."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit

    def replaced() -> bool:
        taken = handover is not None and handover.taken.is_set()
        return taken or others_listening(port, own)

    if not replaced():
        log.info("keeping port %d open until a replacement listens (at most %.0fs)", port, limit)
    while not replaced() and loop.time() < deadline:
        await asyncio.sleep(0.05)


def listeners_on(port: int, table: str) -> int:
    """How many listening sockets of one /proc/net/tcp-format table use `port`."""
    count = 0
    for line in table.splitlines()[1:]:
        fields = line.split()
        if len(fields) > 3 and fields[3] == LISTEN:
            local = fields[1]
            if int(local.rsplit(":", 1)[1], 16) == port:
                count += 1
    return count


def others_listening(port: int, own: int = 1) -> bool:
    """Whether a socket other than our `own` ones listens on `port` (True when the
    kernel's tables cannot be read: then there is nothing to wait for)."""
    total = 0
    readable = False
    for path in TABLES:
        try:
            total += listeners_on(port, path.read_text())
            readable = True
        except OSError:
            continue
    return total > own or not readable
