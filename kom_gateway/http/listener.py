"""One listening port for HTTP/2 and HTTP/1.1.

With TLS, ALPN decides (`h2` or `http/1.1`). Without TLS, a connection that opens with
the HTTP/2 client preface is h2c (prior knowledge); anything else is HTTP/1.1.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from typing import cast

from aiohttp import web

from kom_gateway.http.h1server import StreamHandler, UpgradeHandler, aiohttp_server
from kom_gateway.http.h2server import H2ServerProtocol, H2ServerSettings

H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


class _Sniffer(asyncio.Protocol):
    """Holds a new connection until it knows which protocol it speaks, then hands over."""

    def __init__(self, listener: Listener) -> None:
        self._listener = listener
        self._transport: asyncio.Transport | None = None
        self._buffer = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is not None:
            self._hand_over(ssl_object.selected_alpn_protocol() == "h2")

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

    def _hand_over(self, is_h2: bool) -> None:
        transport = self._transport
        assert transport is not None
        protocol: asyncio.Protocol = (
            self._listener.new_h2_protocol() if is_h2 else self._listener.h1_server()
        )
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        buffered, self._buffer = self._buffer, b""
        if buffered:
            protocol.data_received(buffered)


class Listener:
    """Serves `handler` on host:port over HTTP/2 and HTTP/1.1."""

    def __init__(
        self,
        handler: StreamHandler,
        upgrade_handler: UpgradeHandler | None = None,
        h2_settings: H2ServerSettings | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.handler = handler
        self.h2_settings = h2_settings or H2ServerSettings()
        self.ssl_context = ssl_context
        self.h1_server: web.Server = aiohttp_server(handler, upgrade_handler)
        self.h2_connections: set[H2ServerProtocol] = set()
        self.server: asyncio.Server | None = None

    def new_h2_protocol(self) -> H2ServerProtocol:
        protocol = H2ServerProtocol(self.handler, self.h2_settings, self.h2_connections.discard)
        self.h2_connections.add(protocol)
        return protocol

    async def start(self, host: str, port: int, reuse_port: bool = False) -> int:
        """Bind and serve; returns the bound port (useful with port 0)."""
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(
            lambda: _Sniffer(self),
            host,
            port,
            ssl=self.ssl_context,
            reuse_address=True,
            reuse_port=reuse_port or None,
            backlog=4096,
        )
        sock = self.server.sockets[0]
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return int(sock.getsockname()[1])

    def goaway_all(self) -> None:
        for protocol in list(self.h2_connections):
            protocol.goaway()

    async def close(self, grace: float = 0.0) -> None:
        """Stop accepting; GOAWAY HTTP/2 clients; give requests `grace` seconds."""
        if self.server is not None:
            self.server.close()
        self.goaway_all()
        await self.h1_server.shutdown(grace)
        if grace > 0:
            deadline = asyncio.get_running_loop().time() + grace
            while self.h2_connections and asyncio.get_running_loop().time() < deadline:
                await asyncio.sleep(0.05)
        for protocol in list(self.h2_connections):
            if protocol.transport is not None:
                protocol.transport.close()


def server_ssl_context(cert_file: str, key_file: str, client_ca_file: str | None) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert_file, key_file)
    context.set_alpn_protocols(["h2", "http/1.1"])
    if client_ca_file:
        context.load_verify_locations(client_ca_file)
        context.verify_mode = ssl.CERT_OPTIONAL  # anonymous and token clients still allowed
    return context
