"""The listener's accept path: a backlog taken a few connections per event-loop pass, out
of file descriptors handled by pausing, failed TLS handshakes counted and costing only
their client."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import socket
import ssl

from h2.events import ConnectionTerminated
from harness import RawH2

from kom_gateway.http import listener as listener_module
from kom_gateway.http.listener import ACCEPTS_PER_PASS, Listener
from kom_gateway.http.settings import ConnectionLimits
from kom_gateway.server.tlsfiles import server_ssl_context


async def _never_called(*_args: object) -> None:  # no request reaches these listeners
    raise AssertionError("no request expected")


async def test_a_backlog_is_taken_a_few_connections_per_pass():
    listener = Listener(_never_called)
    port = await listener.start("127.0.0.1", 0)
    acceptor = listener._acceptor
    assert acceptor is not None
    loop = asyncio.get_running_loop()
    assert loop.remove_reader(acceptor.sock.fileno())  # the test takes the passes itself
    clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(2 * ACCEPTS_PER_PASS + 5)]
    try:
        await asyncio.sleep(0.1)  # every connection is in the kernel's accept queue
        taken = []
        for _ in range(4):
            acceptor._accept()  # one pass's worth, as the loop would call it
            taken.append(len(acceptor._handshakes))  # (none served yet: no await)
        assert taken == [ACCEPTS_PER_PASS, 2 * ACCEPTS_PER_PASS, len(clients), len(clients)]
        for _ in range(100):
            if len(listener.sniffing) == len(clients):
                break
            await asyncio.sleep(0.01)
        assert len(listener.sniffing) == len(clients)  # every one is served
    finally:
        for client in clients:
            client.close()
        await listener.close()


class _OutOfDescriptors:
    """A listening socket whose accept() fails as a process at its file limit does."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self.calls = 0

    def fileno(self) -> int:
        return self._sock.fileno()

    def accept(self) -> tuple[socket.socket, object]:
        self.calls += 1
        raise OSError(errno.EMFILE, "Too many open files")

    def close(self) -> None:
        self._sock.close()


async def test_out_of_file_descriptors_pauses_accepting_then_resumes(monkeypatch):
    monkeypatch.setattr(listener_module, "ACCEPT_RETRY_DELAY", 0.05)
    listener = Listener(_never_called)
    port = await listener.start("127.0.0.1", 0)
    acceptor = listener._acceptor
    real = acceptor.sock
    acceptor.sock = flaky = _OutOfDescriptors(real)  # type: ignore[assignment]
    client = socket.create_connection(("127.0.0.1", port))
    try:
        for _ in range(100):
            if flaky.calls:
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.02)
        assert flaky.calls == 1  # it stopped looking (a readable socket would spin the loop)
        acceptor.sock = real  # descriptors free again: the pending client is taken
        for _ in range(100):
            if listener.sniffing:
                break
            await asyncio.sleep(0.01)
        assert len(listener.sniffing) == 1
    finally:
        client.close()
        await listener.close()


async def test_failed_tls_handshakes_are_counted_and_cost_only_their_client(pki):
    reasons: list[str] = []
    context = server_ssl_context(str(pki.server_cert), str(pki.server_key), str(pki.ca))
    listener = Listener(
        _never_called,
        tls=context,
        limits=ConnectionLimits(tls_handshake_timeout=0.3),
        on_reject=reasons.append,
    )
    port = await listener.start("127.0.0.1", 0)
    trusting = ssl.create_default_context(cafile=str(pki.ca))
    trusting.set_alpn_protocols(["h2"])
    try:
        # plain HTTP to the TLS port: not a ClientHello
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        async with asyncio.timeout(5):
            await reader.read()
        writer.close()
        # a client certificate from another CA
        foreign = ssl.create_default_context(cafile=str(pki.ca))
        foreign.load_cert_chain(str(pki.file("foreign.crt")), str(pki.file("foreign.key")))
        with contextlib.suppress(ssl.SSLError, ConnectionError):
            async with asyncio.timeout(5):
                reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=foreign)
                # TLS 1.3: the refusal arrives after the client's Finished
                assert await reader.read() == b""
        # connected, then silent past the handshake timeout
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        async with asyncio.timeout(5):
            assert await reader.read() == b""
        writer.close()
        for _ in range(100):
            if len(reasons) == 3:
                break
            await asyncio.sleep(0.01)
        assert reasons == ["tls-handshake"] * 3
        # and a well-behaved client is still served
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=trusting)
        assert writer.get_extra_info("ssl_object").selected_alpn_protocol() == "h2"
        writer.close()
        assert reasons == ["tls-handshake"] * 3
    finally:
        await listener.close()


async def test_abort_drops_connections_still_in_their_handshake(pki):
    """A replica dropped at once (abort: as a crash) leaves no connection waiting out its
    handshake timeout."""
    context = server_ssl_context(str(pki.server_cert), str(pki.server_key), str(pki.ca))
    listener = Listener(_never_called, tls=context)  # handshake timeout: the default 10 s
    port = await listener.start("127.0.0.1", 0)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)  # says nothing
    try:
        acceptor = listener._acceptor
        for _ in range(100):
            if acceptor._handshakes:
                break
            await asyncio.sleep(0.01)
        assert len(acceptor._handshakes) == 1
        await listener.abort()
        async with asyncio.timeout(2):
            assert await reader.read() == b""
        assert not acceptor._handshakes
    finally:
        writer.close()


async def test_connections_queued_at_the_drain_are_served_and_told_to_go():
    """Closing the listening socket would reset what its backlog holds: those connections
    are taken first, and one whose HTTP/2 starts after the drain began gets its GOAWAY."""
    listener = Listener(_never_called)
    port = await listener.start("127.0.0.1", 0)
    acceptor = listener._acceptor
    assert asyncio.get_running_loop().remove_reader(acceptor.sock.fileno())  # they queue
    raw = await RawH2.connect(port)  # its preface waits in the kernel with it
    try:
        await asyncio.sleep(0.05)
        listener.stop_accepting()
        listener.goaway_all("drain")
        goaway = None
        async with asyncio.timeout(5):
            while goaway is None:
                events = await raw.events()
                assert events, "closed without a GOAWAY"
                goaway = next((e for e in events if isinstance(e, ConnectionTerminated)), None)
        assert goaway.error_code == 0  # NO_ERROR: a graceful goodbye, not a reset
    finally:
        raw.writer.close()
        await listener.close()
