"""One listening port for HTTP/2 and HTTP/1.1.

With TLS, ALPN decides (`h2` or `http/1.1`). Without TLS, a connection that opens with
the HTTP/2 client preface is h2c (prior knowledge); anything else is HTTP/1.1.

The listener accepts connections itself, as asyncio's own loop does (libuv's accept loop
in uvloop hides the outcome of each TLS handshake): a handshake that fails is counted
(`tls-handshake`), and one event-loop pass takes at most `ACCEPTS_PER_PASS` new
connections, the rest waiting in the kernel's backlog, so a reconnect storm never puts
thousands of handshakes into one pass ahead of the connected clients' requests. When it
stops accepting (a drain) it first takes what the backlog holds, which closing the
socket would reset, unless a replacement was handed the socket; those get the drain's
GOAWAY once their handshake is done.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import ssl
from collections.abc import Callable
from typing import Any, Protocol, cast

import h2.config
import h2.connection
from aiohttp import web
from h2.errors import ErrorCodes

from kom_gateway.http import engine as engines
from kom_gateway.http.h1.server import (
    StreamHandler,
    UpgradeHandler,
    aiohttp_server,
    awaiting_first_request,
)
from kom_gateway.http.serverconn import HTTP2ServerConnection
from kom_gateway.http.settings import ConnectionLimits, H2ServerSettings
from kom_gateway.kube.status import status_body
from kom_gateway.server.bind import BACKLOG, listening_socket

log = logging.getLogger(__name__)

H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
ACCEPTS_PER_PASS = 64  # new connections taken per event-loop pass: at most ~45 ms of
# handshakes with client certificates (~0.7 ms each; bench/README.md, "The storm's
# handshakes")
ACCEPT_RETRY_DELAY = 1.0  # s: out of file descriptors or memory, accepting pauses this long
_OUT_OF_RESOURCES = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


class RotatingContext(Protocol):
    """Serving TLS whose files rotate (server/tlsfiles.py): each new connection gets the
    `current` context, established ones keep what they negotiated."""

    @property
    def current(self) -> ssl.SSLContext: ...


class _Acceptor:
    """Takes connections off a listening socket, at most ACCEPTS_PER_PASS each time the
    loop finds it readable (it stays readable while the backlog holds more), and serves
    each (TLS first, when configured) with the listener's protocol."""

    def __init__(self, listener: Listener, sock: socket.socket) -> None:
        self._listener = listener
        self._loop = asyncio.get_running_loop()
        self.sock = sock
        self._closed = False
        self._handshakes: set[asyncio.Task[Any]] = set()
        sock.setblocking(False)
        self._loop.add_reader(sock.fileno(), self._accept)

    def _accept(self, most: int = ACCEPTS_PER_PASS) -> None:
        for _ in range(most):
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                return
            except OSError as exc:
                if exc.errno not in _OUT_OF_RESOURCES:
                    raise  # the loop logs it; the reader stays
                # Linux keeps the socket readable: stop looking until there is room again
                log.error("cannot accept connections (%s): pausing %.0fs", exc, ACCEPT_RETRY_DELAY)
                self._loop.remove_reader(self.sock.fileno())
                self._loop.call_later(ACCEPT_RETRY_DELAY, self._resume)
                return
            conn.setblocking(False)
            self._serve(conn)

    def _resume(self) -> None:
        if not self._closed:
            self._loop.add_reader(self.sock.fileno(), self._accept)

    def _serve(self, conn: socket.socket) -> None:
        listener = self._listener
        tls = listener.tls
        options: dict[str, Any] = {}
        if tls is not None:
            options["ssl"] = tls if isinstance(tls, ssl.SSLContext) else tls.current
            options["ssl_handshake_timeout"] = listener.limits.tls_handshake_timeout
        task = self._loop.create_task(
            self._loop.connect_accepted_socket(lambda: _Sniffer(listener), conn, **options)
        )
        self._handshakes.add(task)
        task.add_done_callback(self._served)

    def _served(self, task: asyncio.Task[Any]) -> None:
        self._handshakes.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:  # the transport is closed already (a bad certificate, a
            # timeout, a client gone mid-handshake): it costs only that client
            log.debug("connection not served: %r", exc)
            if self._listener.tls is not None:
                self._listener.rejected("tls-handshake", quiet=True)

    def close(self, take_queued: bool = False, abort: bool = False) -> None:
        """Stop accepting and close the socket (a copy handed over lives on). With
        `take_queued`, the connections queued in the backlog are taken first (closing
        the socket would reset them; served, they get the drain's GOAWAY); with `abort`,
        the connections still in their TLS handshake are dropped."""
        if not self._closed:
            if take_queued:
                try:
                    self._accept(BACKLOG)
                except OSError as exc:  # the socket is closing anyway: the rest are reset
                    log.warning("connections queued at the drain not taken: %s", exc)
            self._closed = True
            self._loop.remove_reader(self.sock.fileno())
            self.sock.close()
        if abort:
            for task in list(self._handshakes):
                task.cancel()  # uvloop closes the transport of a cancelled handshake


class _Sniffer(asyncio.Protocol):
    """Holds a new connection until it knows which protocol it speaks, then hands over."""

    def __init__(self, listener: Listener) -> None:
        self._listener = listener
        self._transport: asyncio.Transport | None = None
        self._buffer = b""
        self._deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self._listener.sniffing.add(self)
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is not None:
            self._hand_over(ssl_object.selected_alpn_protocol() == "h2")
        else:
            self._deadline = asyncio.get_running_loop().call_later(
                self._listener.limits.header_read_timeout, self._too_slow
            )

    def _too_slow(self) -> None:
        self._deadline = None
        if self._transport is not None:
            self._listener.rejected("header-timeout")
            self._transport.close()

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        n = min(len(self._buffer), len(H2_PREFACE))
        if self._buffer[:n] != H2_PREFACE[:n]:
            self._hand_over(False)
        elif n == len(H2_PREFACE):
            self._hand_over(True)

    def eof_received(self) -> bool | None:
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        self._listener.sniffing.discard(self)
        if self._deadline is not None:
            self._deadline.cancel()

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    def _hand_over(self, is_h2: bool) -> None:
        transport = self._transport
        assert transport is not None
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        listener = self._listener
        listener.sniffing.discard(self)
        if listener.aborted:  # dropped with everything else: no late hand-over
            transport.abort()
            return
        address = _address(transport)
        if not listener.admit(address):
            listener.rejected("per-address-limit")
            transport.write(_refusal_h2() if is_h2 else _refusal_h1())
            transport.close()
            return
        h2_protocol = listener.new_h2_protocol() if is_h2 else None
        protocol: asyncio.Protocol = h2_protocol or listener.new_h1_protocol()
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        buffered, self._buffer = self._buffer, b""
        if buffered:
            protocol.data_received(buffered)
        if h2_protocol is not None and listener.draining is not None:
            # accepted before the drain, handshake done after it: told to go like the rest
            h2_protocol.goaway(listener.draining)


class Listener:
    """Serves `handler` on host:port over HTTP/2 and HTTP/1.1.

    `tls` is a context, or one whose files rotate (each new connection gets its
    `current`). `limits` and `h2_settings` may be replaced (config reload): new
    connections get the new values. `on_reject(reason)` and `on_abuse(kind)` are told
    when a client is turned away or cut off (for metrics).
    """

    def __init__(
        self,
        handler: StreamHandler,
        upgrade_handler: UpgradeHandler | None = None,
        h2_settings: H2ServerSettings | None = None,
        tls: ssl.SSLContext | RotatingContext | None = None,
        limits: ConnectionLimits | None = None,
        on_reject: Callable[[str], None] | None = None,
        on_abuse: Callable[[str], None] | None = None,
        on_goaway: Callable[[str], None] | None = None,
        engine: engines.Engine | None = None,
    ) -> None:
        self.engine = engine or engines.select()
        self.handler = handler
        self.upgrade_handler = upgrade_handler
        self.h2_settings = h2_settings or H2ServerSettings()
        self.tls = tls
        self.limits = limits or ConnectionLimits()
        self._on_reject = on_reject
        self._on_abuse = on_abuse
        self._on_goaway = on_goaway
        self.on_connections: Callable[[], None] = lambda: None  # the counts below changed
        self.h1_server: web.Server = self._new_h1_server()
        self._retired_h1: list[web.Server] = []
        self.h2_connections: set[HTTP2ServerConnection] = set()
        self.h1_connections = 0
        self.per_address: dict[str, int] = {}
        self._acceptor: _Acceptor | None = None
        self.port = 0  # bound by start()
        self.sniffing: set[_Sniffer] = set()  # connections whose protocol is not known yet
        self.aborted = False
        self.draining: str | None = None  # goaway_all's reason, once it ran

    def _new_h1_server(self) -> web.Server:
        return aiohttp_server(
            self.handler,
            self.upgrade_handler,
            self.limits.max_header_bytes,
            self.limits.header_read_timeout,
            self.limits.idle_timeout,
            self._h1_lost,
        )

    def set_limits(self, limits: ConnectionLimits, h2_settings: H2ServerSettings) -> None:
        """Apply reloaded limits to connections accepted from now on."""
        if limits != self.limits:
            self.limits = limits
            old, self.h1_server = self.h1_server, self._new_h1_server()
            self._retired_h1.append(old)  # its connections live on; shut down with ours
        self.h2_settings = h2_settings

    # -- accounting ----------------------------------------------------------------------
    def admit(self, address: str) -> bool:
        """Count a new connection from `address`, unless it already has its share."""
        count = self.per_address.get(address, 0)
        limit = self.limits.max_connections_per_address
        if limit and count >= limit:
            return False
        self.per_address[address] = count + 1
        return True

    def _release(self, address: str) -> None:
        count = self.per_address.get(address, 0) - 1
        if count > 0:
            self.per_address[address] = count
        else:
            self.per_address.pop(address, None)

    def _h1_lost(self, transport: asyncio.BaseTransport) -> None:
        self.h1_connections -= 1
        self._release(_address(transport))
        self.on_connections()

    def _h2_lost(self, protocol: HTTP2ServerConnection) -> None:
        self.h2_connections.discard(protocol)
        self._release(protocol.remote_addr)
        self.on_connections()

    def open_streams(self) -> int:
        """HTTP/2 streams open now, over all client connections."""
        return sum(len(protocol.streams) for protocol in self.h2_connections)

    def rejected(self, reason: str, quiet: bool = False) -> None:
        if not quiet:
            log.info("client connection turned away: %s", reason)
        if self._on_reject is not None:
            self._on_reject(reason)

    def new_h2_protocol(self) -> HTTP2ServerConnection:
        protocol = self.engine.server(
            self.handler, self.h2_settings, self._h2_lost, self._on_abuse, self._on_goaway
        )
        self.h2_connections.add(protocol)
        self.on_connections()
        return protocol

    def new_h1_protocol(self) -> asyncio.Protocol:
        self.h1_connections += 1
        self.on_connections()
        return self.h1_server()

    async def start(
        self, host: str, port: int, reuse_port: bool = False, sock: socket.socket | None = None
    ) -> int:
        """Bind and serve (or serve on `sock`, a listening socket handed over by the
        instance this one replaces); returns the bound port (useful with port 0)."""
        if sock is None:
            sock = listening_socket(host, port, reuse_port)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # accepted ones inherit it
        self._acceptor = _Acceptor(self, sock)
        self.port = int(sock.getsockname()[1])
        return self.port

    @property
    def listening_socket(self) -> socket.socket | None:
        """The socket to hand to a replacement (see server/handover.py)."""
        return self._acceptor.sock if self._acceptor is not None else None

    def stop_accepting(self, handed_over: bool = False) -> None:
        """Close the listening socket: with SO_REUSEPORT, the kernel sends new
        connections to the other instances from now on. The connections queued on it
        are served first (closing would reset them), unless it was `handed_over` to a
        replacement, where it lives on and they are the replacement's."""
        if self._acceptor is not None:
            self._acceptor.close(take_queued=not handed_over)

    def _awaiting_first_request(self) -> bool:
        return any(awaiting_first_request(s) for s in (*self._retired_h1, self.h1_server))

    def goaway_all(self, reason: str = "drain") -> None:
        """Ask every client to go: HTTP/2 gets a graceful GOAWAY; HTTP/1.1 connections
        close once their current response is done, a connection that has not sent its
        first request yet once that one is answered (h1/server.py's pre_shutdown); idle
        keep-alive ones at the end of the drain (`close`). HTTP/2 connections whose
        handshake completes later get the GOAWAY then."""
        self.draining = reason
        for protocol in list(self.h2_connections):
            protocol.goaway(reason)
        for server in (*self._retired_h1, self.h1_server):
            server.pre_shutdown()

    async def abort(self) -> None:
        """Drop everything at once, as a crashed server would: the listening socket and
        every connection, even one whose protocol is still being told apart."""
        self.aborted = True
        if self._acceptor is not None:
            self._acceptor.close(abort=True)
        for sniffer in list(self.sniffing):
            sniffer.abort()
        for protocol in list(self.h2_connections):
            if protocol.transport is not None:
                protocol.transport.abort()
        await asyncio.gather(
            *(server.shutdown(0.1) for server in (*self._retired_h1, self.h1_server))
        )

    async def close(self, grace: float = 0.0) -> None:
        """Stop accepting; GOAWAY HTTP/2 clients; give open connections `grace`
        seconds to finish, then close what is left."""
        self.stop_accepting()
        self.goaway_all()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        # a connection accepted just before whose first request has not arrived yet
        # (slow client, busy machine) is answered, not closed under it (h1/server.py)
        while (self.sniffing or self._awaiting_first_request()) and loop.time() < deadline:
            await asyncio.sleep(0.05)
        # aiohttp waits without end for a timeout of 0: every shutdown here is bounded
        await asyncio.gather(
            *(server.shutdown(max(grace, 0.1)) for server in (*self._retired_h1, self.h1_server))
        )
        while self.h2_connections and loop.time() < deadline:
            await asyncio.sleep(0.05)
        for protocol in list(self.h2_connections):
            protocol.close()


def _address(transport: asyncio.BaseTransport) -> str:
    peer = transport.get_extra_info("peername")
    return peer[0] if peer else ""


_REFUSAL = status_body(429, "TooManyRequests", "too many connections from this address")


def _refusal_h1() -> bytes:
    """429 with a Status body, then close: what an HTTP/1.1 client over its share reads."""
    head = (
        "HTTP/1.1 429 Too Many Requests\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(_REFUSAL)}\r\nRetry-After: 1\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + _REFUSAL


def _refusal_h2() -> bytes:
    """Server preface, then GOAWAY(ENHANCE_YOUR_CALM) with the reason as debug data."""
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
    conn.initiate_connection()
    conn.close_connection(ErrorCodes.ENHANCE_YOUR_CALM, b"too many connections from this address")
    return conn.data_to_send()
