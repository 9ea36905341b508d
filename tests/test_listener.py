"""The listener: connections still being told apart when a drain begins, queued on its
socket when it closes, TLS handshakes that fail, and ClientHellos of clients already
gone."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import socket
import ssl

import pytest
from h2.events import ConnectionTerminated
from harness import RawH2

from kom_gateway.http.listener import Listener
from kom_gateway.http.settings import ConnectionLimits
from kom_gateway.server.tlsfiles import server_ssl_context


async def _never_called(*_args: object) -> None:  # no request reaches this listener
    raise AssertionError("no request expected")


async def test_a_connection_whose_http2_starts_after_the_drain_began_is_told_to_go(engine):
    """A client connected before the drain whose preface arrives after it (a handshake
    still running, a slow client) gets the drain's graceful GOAWAY as the others did,
    not a cut at the drain's end (either engine)."""
    listener = Listener(_never_called)
    assert listener.engine.name == engine
    port = await listener.start("127.0.0.1", 0)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        async with asyncio.timeout(5):
            while not listener.sniffing:  # accepted, protocol not known yet
                await asyncio.sleep(0.01)
        listener.stop_accepting()
        listener.goaway_all("drain")
        raw = RawH2(reader, writer)  # its preface, now
        goaway = None
        async with asyncio.timeout(5):
            while goaway is None:
                events = await raw.events()
                assert events, "closed without a GOAWAY"
                goaway = next((e for e in events if isinstance(e, ConnectionTerminated)), None)
        assert goaway.error_code == 0  # NO_ERROR: a graceful goodbye, not a reset
    finally:
        writer.close()
        await listener.close()


LOOPS = ("asyncio", "uvloop")  # tests run on asyncio's loop; the gateway runs on uvloop's


def run_on(loop_kind: str, main) -> None:
    if loop_kind == "uvloop":
        import uvloop

        uvloop.run(main())
    else:
        asyncio.run(main())


@pytest.mark.parametrize("loop_kind", LOOPS)
def test_failed_tls_handshakes_are_counted_by_kind(pki, loop_kind):
    """The loop runs the handshakes and says nothing of one that fails; the listener
    counts each (a certificate from another CA, a client that does not speak TLS:
    `tls-handshake`; one that leaves after its ClientHello: `tls-handshake-abandoned`;
    one that never finishes: `tls-handshake-timeout`), shows the connections still in
    their handshake, and counts nothing for a good client or a TCP health check
    (connected and closed without a byte)."""
    reasons: list[str] = []
    server_tls = server_ssl_context(str(pki.server_cert), str(pki.server_key), str(pki.ca))
    limits = ConnectionLimits(tls_handshake_timeout=0.5)

    def client_tls(cert, key) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(pki.ca))
        context.load_cert_chain(str(cert), str(key))
        context.set_alpn_protocols(["h2"])
        return context

    async def until(condition) -> None:
        async with asyncio.timeout(5):
            while not condition():
                await asyncio.sleep(0.01)
                if loop_kind == "asyncio":  # it holds a failed handshake's TLS object
                    gc.collect()  # in a cycle until collected; uvloop drops it at once

    async def main() -> None:
        listener = Listener(
            _never_called, ssl_context=server_tls, limits=limits, on_reject=reasons.append
        )
        port = await listener.start("127.0.0.1", 0)
        try:
            # a good client: through, nothing counted
            _, good = await asyncio.open_connection(
                "127.0.0.1", port, ssl=client_tls(pki.kubelet_cert, pki.kubelet_key)
            )
            await until(lambda: listener.h2_connections)
            assert listener.handshaking == 0 and reasons == []

            # a certificate from another CA (TLS 1.3: the client learns it only after)
            try:
                _, mallory = await asyncio.open_connection(
                    "127.0.0.1", port, ssl=client_tls(pki.foreign_cert, pki.foreign_key)
                )
                mallory.close()
            except (ssl.SSLError, ConnectionError):
                pass
            await until(lambda: reasons == ["tls-handshake"])

            # a TCP health check: connects and closes, no byte sent; not a failed handshake
            socket.create_connection(("127.0.0.1", port)).close()
            await until(lambda: listener.handshaking == 0)

            # not TLS at all
            reader, plain = await asyncio.open_connection("127.0.0.1", port)
            plain.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            await reader.read()  # an alert, or nothing, then closed
            plain.close()
            await until(lambda: reasons == ["tls-handshake"] * 2)

            # a client that sends its ClientHello and leaves: abandoned, not refused
            hello = ssl.create_default_context(cafile=str(pki.ca)).wrap_bio(
                ssl.MemoryBIO(), outgoing := ssl.MemoryBIO(), server_hostname="127.0.0.1"
            )
            with contextlib.suppress(ssl.SSLWantReadError):
                hello.do_handshake()
            reader, leaver = await asyncio.open_connection("127.0.0.1", port)
            leaver.write(outgoing.read())
            await reader.readexactly(1)  # the server's answer: it read the hello
            leaver.close()
            await until(lambda: reasons[2:] == ["tls-handshake-abandoned"])

            # a client that connects and never starts: in its handshake, then dropped
            reader, silent = await asyncio.open_connection("127.0.0.1", port)
            await until(lambda: listener.handshaking == 1)
            async with asyncio.timeout(5):
                assert await reader.read() == b""
            silent.close()
            await until(lambda: reasons[3:] == ["tls-handshake-timeout"])
            assert listener.handshaking == 0
            good.close()
        finally:
            await listener.close()

    run_on(loop_kind, main)


@pytest.mark.parametrize("tls", (False, True), ids=("plain", "tls"))
@pytest.mark.parametrize("loop_kind", LOOPS)
def test_connections_queued_at_a_drain_are_served_not_reset(pki, loop_kind, tls, engine):
    """Connections the kernel has queued on the listening socket when a drain with no
    replacement closes it would be reset by the close; the listener takes them first,
    and each is told to go (HTTP/2 GOAWAY) like the rest, on either HTTP/2 engine.
    (Without taking them, each of these clients reads a reset.)"""
    server_tls = (
        server_ssl_context(str(pki.server_cert), str(pki.server_key), None) if tls else None
    )
    queued = 5

    async def main() -> None:
        listener = Listener(_never_called, ssl_context=server_tls)
        assert listener.engine.name == engine
        port = await listener.start("127.0.0.1", 0)
        # connected while the loop cannot accept: they wait in the kernel's queue
        socks = [socket.create_connection(("127.0.0.1", port)) for _ in range(queued)]
        listener.stop_accepting(take_queued=True)
        listener.goaway_all("drain")
        try:
            client_tls = None
            if tls:
                client_tls = ssl.create_default_context(cafile=str(pki.ca))
                client_tls.set_alpn_protocols(["h2"])
            for sock in socks:
                sock.setblocking(False)
                async with asyncio.timeout(5):
                    reader, writer = await asyncio.open_connection(
                        sock=sock, ssl=client_tls, server_hostname="127.0.0.1" if tls else None
                    )
                raw = RawH2(reader, writer)
                goaway = None
                async with asyncio.timeout(5):
                    while goaway is None:
                        events = await raw.events()
                        assert events, "closed without a GOAWAY"
                        goaway = next(
                            (e for e in events if isinstance(e, ConnectionTerminated)), None
                        )
                assert goaway.error_code == 0
                writer.close()
        finally:
            for sock in socks:
                sock.close()
            await listener.close()

    run_on(loop_kind, main)


def _client_hello(pki) -> bytes:
    hello = ssl.create_default_context(cafile=str(pki.ca)).wrap_bio(
        ssl.MemoryBIO(), outgoing := ssl.MemoryBIO(), server_hostname="127.0.0.1"
    )
    with contextlib.suppress(ssl.SSLWantReadError):
        hello.do_handshake()
    return outgoing.read()


@pytest.mark.parametrize("when", ("queued", "accepted"))
@pytest.mark.parametrize("loop_kind", LOOPS)
def test_a_clienthello_whose_client_has_left_is_not_answered(pki, loop_kind, when):
    """In a reconnect storm clients give up while their connections wait, in the kernel's
    queue or for the loop to get to their handshake; answering each ClientHello would
    cost a key exchange and a signature for nobody. A client that sent its ClientHello
    and closed its side before the listener accepted it (`queued`), or after it was
    accepted but before the loop read its hello (`accepted`), reads no answer, only the
    close; it is counted `tls-client-gone`, not as a handshake answered and abandoned.
    A live client right after it is served as always."""
    reasons: list[str] = []
    server_tls = server_ssl_context(str(pki.server_cert), str(pki.server_key), str(pki.ca))

    async def until(condition) -> None:
        async with asyncio.timeout(5):
            while not condition():
                await asyncio.sleep(0.01)
                if loop_kind == "asyncio":  # (a failed handshake's TLS object is freed
                    gc.collect()  # by the collector there)

    async def main() -> None:
        listener = Listener(_never_called, ssl_context=server_tls, on_reject=reasons.append)
        port = await listener.start("127.0.0.1", 0)
        try:
            # blocking calls: the loop cannot accept or read in between
            leaver = socket.create_connection(("127.0.0.1", port))
            if when == "accepted":
                await until(lambda: listener.handshaking == 1)  # accepted, nothing read
            leaver.sendall(_client_hello(pki))
            leaver.shutdown(socket.SHUT_WR)  # gone, as far as TCP says: it can still read
            leaver.setblocking(False)
            loop = asyncio.get_running_loop()
            try:
                async with asyncio.timeout(5):
                    answer = await loop.sock_recv(leaver, 65536)
            except ConnectionResetError:  # (closed with the hello unread: a reset)
                answer = b""
            leaver.close()
            assert answer == b""  # no ServerHello: closed unanswered
            await until(lambda: reasons == ["tls-client-gone"])
            assert listener.handshaking == 0

            context = ssl.create_default_context(cafile=str(pki.ca))
            context.load_cert_chain(str(pki.kubelet_cert), str(pki.kubelet_key))
            context.set_alpn_protocols(["h2"])
            _, good = await asyncio.open_connection("127.0.0.1", port, ssl=context)
            await until(lambda: listener.h2_connections)
            good.close()
            assert reasons == ["tls-client-gone"]
        finally:
            await listener.close()

    run_on(loop_kind, main)


def test_a_connection_is_set_up_in_the_accepting_pass_and_then_driven_as_a_task():
    """`_start_now` runs a coroutine to its first wait at once (what a task would do a
    loop pass later: in a storm, a pass of hundreds of handshakes), then drives the rest
    as a task: results and errors are passed in, a cancellation reaches the coroutine,
    and nothing of the driver holds what the coroutine raised."""
    from kom_gateway.http.listener import _start_now

    async def main() -> None:
        loop = asyncio.get_running_loop()
        steps: list[str] = []

        async def connect(waiter: asyncio.Future, then: asyncio.Future) -> str:
            steps.append("set up")
            first = await waiter
            steps.append(f"got {first}")
            try:
                await then
            except ValueError as exc:
                steps.append(f"raised {exc}")
                await asyncio.sleep(0)  # a bare yield on the way
                return "recovered"
            except asyncio.CancelledError:
                steps.append("cancelled")
                raise
            return "unreached"

        waiter, then = loop.create_future(), loop.create_future()
        task = _start_now(loop, connect(waiter, then))
        assert steps == ["set up"] and task is not None  # before any pass of the loop
        waiter.set_result(1)
        then.set_exception(ValueError("no"))
        assert await task == "recovered"
        assert steps == ["set up", "got 1", "raised no"]

        class Gone(Exception):
            pass

        async def fails(waiter: asyncio.Future) -> None:
            await waiter

        waiter = loop.create_future()
        task = _start_now(loop, fails(waiter))
        assert task is not None
        error = Gone()
        waiter.set_exception(error)
        with pytest.raises(Gone):
            await task
        # the driver's frame in the traceback holds neither the error nor the future
        # that holds it: a failed connection's objects are freed at once, not by the
        # cycle collector
        drivers = []
        tb = error.__traceback__
        while tb is not None:
            if tb.tb_frame.f_code.co_name == "_resume":
                drivers.append(tb.tb_frame)
            tb = tb.tb_next
        assert drivers
        for frame in drivers:
            held = list(frame.f_locals.values())
            assert all(value is not error and value is not waiter for value in held)

        waiter, then = loop.create_future(), loop.create_future()
        steps.clear()
        task = _start_now(loop, connect(waiter, then))
        waiter.set_result(2)
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert steps == ["set up", "got 2", "cancelled"]

        async def at_once() -> str:
            return "done"

        assert _start_now(loop, at_once()) is None  # ended without waiting: no task

    asyncio.run(main())
