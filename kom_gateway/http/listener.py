"""One listening port for HTTP/2 and HTTP/1.1.

With TLS, ALPN decides (`h2` or `http/1.1`). Without TLS, a connection that opens with
the HTTP/2 client preface is h2c (prior knowledge); anything else is HTTP/1.1.

The listener accepts connections itself, everything the kernel has queued each time the
socket is readable (as libuv's accept loop does), and hands each to the event loop, which
runs its TLS handshake. A ClientHello whose client has already left is not answered
(`client_gone`): in a reconnect storm thousands of clients give up while their
connections wait, in the kernel's queue or for the loop, and each would cost the server's
half of a handshake for nobody (bench/README.md, "Clients gone before their handshake"). How each
handshake goes, which the loop does not say, the listener learns from the TLS object the
loop makes per connection (`_TLSHandshake`): handshakes under way (a gauge), failed ones
(counted by reason). Stopping without a replacement, the listener first takes what the
kernel queued on the socket, which closing it would reset.
"""

from __future__ import annotations

import asyncio
import contextvars
import errno
import logging
import socket
import ssl
import time
from collections.abc import Callable, Coroutine
from typing import Any, ClassVar, cast

import h2.config
import h2.connection
from aiohttp import web
from h2.errors import ErrorCodes

from kom_gateway.compat import LoopTLSObject
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
HANDSHAKE_TIMER_SLACK = 0.05  # s: uvloop's timers fire to the millisecond, a little early
ACCEPT_RETRY_DELAY = 1.0  # s: out of file descriptors or memory, accepting pauses this long
_OUT_OF_RESOURCES = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
TCP_ESTABLISHED = 1  # `tcpi_state`, the first byte of Linux's struct tcp_info


def client_gone(conn: socket.socket) -> bool:
    """The client of an accepted connection has already closed it (its FIN or RST came
    while the connection waited: it is no longer ESTABLISHED). A TLS client never
    half-closes before its handshake, so one with a ClientHello sent is one that gave
    up. False where the kernel does not say."""
    if not hasattr(socket, "TCP_INFO"):
        return False
    try:
        state = conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0]
    except OSError:
        return False
    return state != TCP_ESTABLISHED


def _start_now(
    loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, Any]
) -> asyncio.Task[Any] | None:
    """Run `coro` up to its first wait now, the rest as a task (Python 3.12's eager
    start): a connection handed to the loop from the accept's callback is set up in
    the same loop pass, as the loop's own accept does, not a pass later (in a storm a
    pass is hundreds of handshakes long). None when `coro` ended without waiting;
    what it raises on the way is raised."""
    try:
        waiting = coro.send(None)
    except StopIteration:
        return None
    return loop.create_task(_resume(coro, waiting))


async def _resume(coro: Coroutine[Any, Any, Any], waiting: Any) -> Any:
    """The rest of a coroutine `_start_now` began, driven as a task drives one: each
    future it waits on is awaited here, its outcome sent (or thrown) back in."""
    while True:
        error: BaseException | None = None
        try:
            if waiting is None:  # a bare yield: a pass of the loop
                await asyncio.sleep(0)
            else:
                waiting._asyncio_future_blocking = False  # taken over, as a task does
                await waiting
        except BaseException as exc:  # (our own cancellation included: passed in)
            error = exc
        # nothing of this frame may hold what `coro` raises (through the future, or
        # itself), or the connection's objects wait for the cycle collector
        waiting = None
        try:
            waiting = coro.send(None) if error is None else coro.throw(error)
        except StopIteration as done:
            return done.value
        finally:
            error = None


# the accepted socket of the connection whose callbacks the loop runs: set in the context
# the listener hands each connection to the loop with, which runs them all in it
_ACCEPTED: contextvars.ContextVar[socket.socket | None] = contextvars.ContextVar(
    "kom_gateway_accepted", default=None
)


class _TLSHandshake(LoopTLSObject):
    """The TLS side of one client connection, made by the event loop through
    `SSLContext.sslobject_class` (the listener sets a subclass naming itself). The loop
    runs the handshake and says nothing of one that fails; this says it to the
    listener: when the handshake is done, or when the loop drops it unfinished
    (promptly on uvloop, the gateway's loop; asyncio's own loop holds a failed one in a
    reference cycle until the collector runs). A ClientHello whose client has left by
    the time the loop gets to it is not answered: in a storm a loop pass of hundreds of
    handshakes outlasts clients' patience, and the answer would cost a key exchange and
    a signature for nobody."""

    listener: ClassVar[Listener]
    _began = 0.0  # when the loop first asked for the handshake (0: it never did)
    _done = False
    _refused = False  # OpenSSL refused what the client sent
    _gone = False  # the client left before its ClientHello was answered

    def do_handshake(self) -> None:
        if not self._began:  # (at the connection's start: nothing read yet)
            self._began = time.monotonic()
            self.listener.handshake_began()
        elif self.cipher() is None:  # the ClientHello, read, is not answered yet
            sock = _ACCEPTED.get()
            if sock is not None and client_gone(sock):
                self._gone = True
                raise ssl.SSLError("the client left before its ClientHello was answered")
        try:
            super().do_handshake()
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            raise
        except ssl.SSLError:
            self._refused = True
            raise
        if not self._done:
            self._done = True
            self.listener.handshake_done()

    def __del__(self) -> None:
        if self._began and not self._done:
            # a ClientHello read has a cipher chosen; a client that sent nothing (closed
            # at once: a TCP health check) has none and was no handshake at all
            self.listener.handshake_failed(
                time.monotonic() - self._began,
                self._refused,
                self.cipher() is not None,
                self._gone,
            )


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
            # accepted before the drain, told apart after it: told to go like the rest
            h2_protocol.goaway(listener.draining)


class Listener:
    """Serves `handler` on host:port over HTTP/2 and HTTP/1.1.

    `limits` and `h2_settings` may be replaced (config reload): new connections get the
    new values. `on_reject(reason)` and `on_abuse(kind)` are told when a client is
    turned away or cut off (for metrics). The handshakes of `ssl_context` are counted
    for the listener made last with it (the simulator's groups share one, uncounted).
    """

    def __init__(
        self,
        handler: StreamHandler,
        upgrade_handler: UpgradeHandler | None = None,
        h2_settings: H2ServerSettings | None = None,
        ssl_context: ssl.SSLContext | None = None,
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
        self.ssl_context = ssl_context
        if ssl_context is not None:  # the TLS objects the loop makes report to us
            ssl_context.sslobject_class = type(
                "TLSHandshake", (_TLSHandshake,), {"listener": self}
            )
        self.limits = limits or ConnectionLimits()
        self._on_reject = on_reject
        self._on_abuse = on_abuse
        self._on_goaway = on_goaway
        self.h1_server: web.Server = self._new_h1_server()
        self._retired_h1: list[web.Server] = []
        self.h2_connections: set[HTTP2ServerConnection] = set()
        self.h1_connections = 0
        self.per_address: dict[str, int] = {}
        self._sock: socket.socket | None = None  # the listening socket, while accepting
        self.port = 0  # bound by start()
        self.sniffing: set[_Sniffer] = set()  # connections whose protocol is not known yet
        self.handshaking = 0  # connections in their TLS handshake
        self._taking: set[asyncio.Task[Any]] = set()  # accepted, handed to the loop
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

    def _h2_lost(self, protocol: HTTP2ServerConnection) -> None:
        self.h2_connections.discard(protocol)
        self._release(protocol.remote_addr)

    def open_streams(self) -> int:
        """HTTP/2 streams open now, over all client connections."""
        return sum(len(protocol.streams) for protocol in self.h2_connections)

    def rejected(self, reason: str, quiet: bool = False) -> None:
        if not quiet:
            log.info("client connection turned away: %s", reason)
        if self._on_reject is not None:
            self._on_reject(reason)

    def handshake_began(self) -> None:
        self.handshaking += 1

    def handshake_done(self) -> None:
        self.handshaking -= 1

    def handshake_failed(
        self, seconds: float, refused: bool, said_hello: bool, gone: bool = False
    ) -> None:
        """A TLS handshake ended unfinished, counted by why (not logged one by one: a
        storm of them must not flood the log):

        - `tls-handshake-timeout`: it ran into the limit (a storm bigger than the CPU,
          or a client that stalls);
        - `tls-handshake`: OpenSSL refused what the client sent (a certificate from
          another CA, not TLS, no common protocol or cipher);
        - `tls-handshake-abandoned`: the client left after its ClientHello was answered
          (it gave up, or no longer needed the connection: the load model's Go clients
          leave a few of their reconnects so in a storm);
        - `tls-client-gone`: it had left before its ClientHello was answered (while
          queued, or before the loop got to it), which was then not answered.

        A client that closed without sending a byte (a TCP health check) is none."""
        self.handshaking -= 1
        if seconds >= self.limits.tls_handshake_timeout - HANDSHAKE_TIMER_SLACK:
            self.rejected("tls-handshake-timeout", quiet=True)
        elif gone:
            self.rejected("tls-client-gone", quiet=True)
        elif refused:
            self.rejected("tls-handshake", quiet=True)
        elif said_hello:
            self.rejected("tls-handshake-abandoned", quiet=True)

    def new_h2_protocol(self) -> HTTP2ServerConnection:
        protocol = self.engine.server(
            self.handler, self.h2_settings, self._h2_lost, self._on_abuse, self._on_goaway
        )
        self.h2_connections.add(protocol)
        return protocol

    def new_h1_protocol(self) -> asyncio.Protocol:
        self.h1_connections += 1
        return self.h1_server()

    async def start(
        self, host: str, port: int, reuse_port: bool = False, sock: socket.socket | None = None
    ) -> int:
        """Bind and serve (or serve on `sock`, a listening socket handed over by the
        instance this one replaces); returns the bound port (useful with port 0)."""
        if sock is None:
            sock = listening_socket(host, port, reuse_port)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # accepted ones inherit it
        sock.setblocking(False)
        self._sock = sock
        asyncio.get_running_loop().add_reader(sock.fileno(), self._accept, sock)
        self.port = int(sock.getsockname()[1])
        return self.port

    def _tls(self) -> dict[str, Any]:
        """How the loop serves a connection's TLS."""
        if self.ssl_context is None:
            return {}
        return {
            "ssl": self.ssl_context,
            "ssl_handshake_timeout": self.limits.tls_handshake_timeout,
        }

    @property
    def listening_socket(self) -> socket.socket | None:
        """The socket to hand to a replacement (see server/handover.py)."""
        return self._sock

    def _accept(self, sock: socket.socket) -> int:
        """Take every connection the kernel has queued on `sock` and hand each to the
        loop (TLS first, when configured), with the socket in its context for
        `_TLSHandshake`. Returns how many were handed over."""
        loop = asyncio.get_running_loop()
        tls = self._tls()
        taken = 0
        for _ in range(BACKLOG):  # (however fast clients come, the pass ends)
            try:
                conn, _ = sock.accept()
            except (BlockingIOError, InterruptedError):
                break
            except ConnectionAbortedError:
                continue
            except OSError as exc:
                if exc.errno in _OUT_OF_RESOURCES and sock is self._sock:
                    # Linux keeps the socket readable: stop looking until there is room
                    log.error("cannot accept connections (%s): pausing %.0fs",
                              exc, ACCEPT_RETRY_DELAY)  # fmt: skip
                    loop.remove_reader(sock.fileno())
                    loop.call_later(ACCEPT_RETRY_DELAY, self._resume_accepting, sock)
                else:
                    log.warning("connections queued on the listening socket not taken: %s", exc)
                break
            conn.setblocking(False)
            context = contextvars.copy_context()
            context.run(_ACCEPTED.set, conn)
            coro = loop.connect_accepted_socket(lambda: _Sniffer(self), conn, **tls)
            try:
                task = context.run(_start_now, loop, coro)
            except Exception:  # (the loop refused the socket: it costs only this one)
                log.warning("accepted connection not served", exc_info=True)
                conn.close()
                continue
            if task is not None:
                self._taking.add(task)
                task.add_done_callback(self._taken)
            taken += 1
        return taken

    def _resume_accepting(self, sock: socket.socket) -> None:
        if sock is self._sock:
            asyncio.get_running_loop().add_reader(sock.fileno(), self._accept, sock)

    def _taken(self, task: asyncio.Task[Any]) -> None:
        self._taking.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            # a failed handshake: the transport is closed, its TLS object counted it
            log.debug("accepted connection not served: %r", exc)

    def stop_accepting(self, take_queued: bool = False) -> None:
        """Close the listening socket: with SO_REUSEPORT, the kernel sends new
        connections to the other instances from now on; a socket handed over to a
        replacement lives on there. With `take_queued` (a drain no replacement took the
        socket from), the connections the kernel has queued on it are taken first and
        served (closing the socket would reset them); they get the drain's GOAWAY."""
        sock, self._sock = self._sock, None
        if sock is None:
            return
        asyncio.get_running_loop().remove_reader(sock.fileno())
        if take_queued and (taken := self._accept(sock)):
            log.info("took %d connections queued on the listening socket", taken)
        sock.close()

    def _awaiting_first_request(self) -> bool:
        return any(awaiting_first_request(s) for s in (*self._retired_h1, self.h1_server))

    def goaway_all(self, reason: str = "drain") -> None:
        """Ask every client to go: HTTP/2 gets a graceful GOAWAY; HTTP/1.1 connections
        close once their current response is done, a connection that has not sent its
        first request yet once that one is answered (h1/server.py's pre_shutdown); idle
        keep-alive ones at the end of the drain (`close`). HTTP/2 connections whose
        handshake or preface completes later get the GOAWAY then."""
        self.draining = reason
        for protocol in list(self.h2_connections):
            protocol.goaway(reason)
        for server in (*self._retired_h1, self.h1_server):
            server.pre_shutdown()

    async def abort(self) -> None:
        """Drop everything at once, as a crashed server would: the listening socket and
        every connection, even one whose protocol is still being told apart."""
        self.aborted = True
        self.stop_accepting()
        for task in list(self._taking):
            task.cancel()
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
        self.stop_accepting(take_queued=True)
        self.goaway_all()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        # a connection accepted just before whose first request has not arrived yet
        # (slow client, busy machine) is answered, not closed under it (h1/server.py)
        while (
            self.sniffing or self.handshaking or self._taking or self._awaiting_first_request()
        ) and loop.time() < deadline:
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
