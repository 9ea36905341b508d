"""The TLS object the loop makes per connection (`compat.LoopTLSObject`): its read, write
and pending are the C object's own methods, and it behaves as the stock `ssl.SSLObject`."""

import asyncio
import contextlib
import ssl
import types

import pytest
import uvloop

from kom_gateway.compat import SSL_C_METHODS, LoopTLSObject
from kom_gateway.config.model import UpstreamTLS
from kom_gateway.http.listener import Listener
from kom_gateway.proxy.upstreams import _client_context
from kom_gateway.server.tlsfiles import server_ssl_context


def _pair(pki, server_class):
    server_ctx = server_ssl_context(str(pki.server_cert), str(pki.server_key), None)
    server_ctx.sslobject_class = server_class
    client_ctx = ssl.create_default_context(cafile=str(pki.ca))
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    client = client_ctx.wrap_bio(c_in, c_out, server_hostname="localhost")
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    for _ in range(10):  # the handshake, in memory
        for side in (client, server):
            with contextlib.suppress(ssl.SSLWantReadError):
                side.do_handshake()
        s_in.write(c_out.read())
        c_in.write(s_out.read())
    assert server.version() == "TLSv1.3"
    return client, c_in, c_out, server, s_in, s_out


def _exercise(pki, server_class):
    """What the loop asks of a server TLS object, and what it answers."""
    client, c_in, c_out, server, s_in, s_out = _pair(pki, server_class)
    seen = []
    with pytest.raises(ssl.SSLWantReadError):
        server.read(1024)  # nothing yet
    client.write(b"x" * 3000)
    client.write(b"second record")
    s_in.write(c_out.read())
    seen.append(server.pending())  # nothing decrypted yet
    seen.append(server.read(100))  # part of the first record...
    seen.append(server.pending())  # ...the rest of it waits decrypted
    buffer = bytearray(5000)
    seen.append(server.read(5000, buffer))  # into a buffer: a count
    seen.append(bytes(buffer[: seen[-1]]))
    seen.append(server.read(5000))
    with pytest.raises(ssl.SSLWantReadError):
        server.read(5000)
    seen.append(server.write(b"answer"))
    c_in.write(s_out.read())
    seen.append(client.read(100))
    with pytest.raises(TypeError):
        server.write("not bytes")
    return seen


def test_the_hot_methods_are_the_c_objects_own(pki):
    assert SSL_C_METHODS  # every supported Python keeps the C object where the probe looks
    _, _, _, server, _, _ = _pair(pki, LoopTLSObject)
    for name in ("read", "write", "pending"):
        method = getattr(server, name)
        assert isinstance(method, types.BuiltinMethodType), name
        assert type(method.__self__).__name__ == "_SSLSocket"
    _, _, _, stock, _, _ = _pair(pki, ssl.SSLObject)
    assert isinstance(stock.read, types.MethodType)  # the stock one: a Python method


def test_it_answers_as_the_stock_object_does(pki):
    direct = _exercise(pki, LoopTLSObject)
    assert direct == _exercise(pki, ssl.SSLObject)
    assert direct[:4] == [0, b"x" * 100, 2900, 2900]


async def test_the_gateway_serves_and_dials_with_it(pki):
    listener = Listener(
        lambda stream: None,
        ssl_context=server_ssl_context(str(pki.server_cert), str(pki.server_key), None),
    )
    assert issubclass(listener.ssl_context.sslobject_class, LoopTLSObject)
    upstream = _client_context(UpstreamTLS(ca_file=str(pki.ca)), "h2")
    assert upstream.sslobject_class is LoopTLSObject


def test_uvloop_moves_records_through_it(pki):
    """uvloop looks the methods up once per connection and keeps them: a TLS echo over
    a real socket, both ends on this class, several records each way."""

    class Echo(asyncio.Protocol):
        def connection_made(self, transport):
            self.transport = transport

        def data_received(self, data):
            self.transport.write(data.upper())

    async def main():
        loop = asyncio.get_running_loop()
        server_ctx = server_ssl_context(str(pki.server_cert), str(pki.server_key), None)
        server_ctx.sslobject_class = LoopTLSObject
        server = await loop.create_server(Echo, "127.0.0.1", 0, ssl=server_ctx)
        port = server.sockets[0].getsockname()[1]
        client_ctx = ssl.create_default_context(cafile=str(pki.ca))
        client_ctx.sslobject_class = LoopTLSObject
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=client_ctx, server_hostname="localhost"
        )
        tls = writer.get_extra_info("ssl_object")
        assert isinstance(tls, LoopTLSObject)
        got = b""
        for i in range(20):
            payload = bytes([97 + i % 26]) * (1000 * i + 1)
            writer.write(payload)
            await writer.drain()
            want = len(got) + len(payload)
            while len(got) < want:
                got += await asyncio.wait_for(reader.read(65536), 10)
            assert got[-len(payload):] == payload.upper()
        writer.close()
        await writer.wait_closed()
        server.close()
        await server.wait_closed()

    uvloop.run(main())
