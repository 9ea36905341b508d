"""Which sockets listen on a port, from the kernel's tables (restart in place)."""

import socket

from kom_gateway.server.handover import listeners_on, others_listening

TABLE = """\
  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1
   1: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 2 1
   2: 0100007F:1F90 0100007F:D2F0 01 00000000:00000000 00:00000000 00000000     0        0 3 1
   3: 00000000:0050 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4 1
"""


def test_listeners_are_counted_per_port_and_only_listening_ones():
    assert listeners_on(8080, TABLE) == 2  # the established connection is not one
    assert listeners_on(80, TABLE) == 1
    assert listeners_on(443, TABLE) == 0


def test_a_second_reuse_port_listener_is_seen():
    first = socket.socket()
    first.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    first.bind(("127.0.0.1", 0))
    first.listen()
    port = first.getsockname()[1]
    second = socket.socket()
    try:
        assert not others_listening(port)
        second.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        second.bind(("127.0.0.1", port))
        second.listen()
        assert others_listening(port)
    finally:
        first.close()
        second.close()


async def test_a_replacement_is_handed_the_very_listening_socket():
    """In one process for the test: the old side's HandoverServer answers `take_over`
    with its listening socket; once confirmed, the old side's fd can close and the
    socket keeps listening in the new side's hands (a queued connection is not lost)."""
    import asyncio
    import os

    from kom_gateway.server.handover import SUPPORTED, HandoverServer, take_over

    if not SUPPORTED:
        return
    listening = socket.socket()
    listening.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listening.bind(("127.0.0.1", 0))
    listening.listen()
    port = listening.getsockname()[1]
    server = HandoverServer({"serving": listening})
    server.start("127.0.0.1", port)
    try:
        await asyncio.sleep(0.1)
        inherited = await asyncio.to_thread(take_over, "127.0.0.1", port)
        assert inherited is not None and inherited.pid == os.getpid()
        got = inherited.sockets["serving"]
        assert got.getsockname() == listening.getsockname()
        inherited.confirm()
        await asyncio.wait_for(server.taken.wait(), 5)
        queued = socket.create_connection(("127.0.0.1", port))  # queued, not accepted
        listening.close()  # the old side lets go of its fd
        got.settimeout(5)
        conn, _ = got.accept()  # the very connection, from the same socket
        conn.close()
        queued.close()
        got.close()
        # and nobody answers for a port no instance serves, or for port 0
        assert await asyncio.to_thread(take_over, "127.0.0.1", port) is None
        assert take_over("127.0.0.1", 0) is None
    finally:
        server.close()
