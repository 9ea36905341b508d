"""The listener around a drain: connections still being told apart when it begins."""

from __future__ import annotations

import asyncio

from h2.events import ConnectionTerminated
from harness import RawH2

from kom_gateway.http.listener import Listener


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
