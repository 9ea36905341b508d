"""HTTP/1.1 clients that open a new connection for every request (as curl in a loop, or
a client without keep-alive): what a restart that drops queued connections hurts. Used
by the restart tests and bench/hostile_bench.py."""

from __future__ import annotations

import asyncio
from collections import Counter

REQUEST = (b"GET /api/v1/namespaces/default/configmaps HTTP/1.1\r\nHost: gw\r\n"
           b"User-Agent: per-request/1.0\r\nConnection: close\r\n\r\n")


async def connection_per_request(port: int, stop: asyncio.Event, tasks: int = 48) -> Counter:
    """Run `tasks` such clients against 127.0.0.1:port until `stop`; the outcomes: the
    status of each answer, "empty" for a connection closed unanswered, or the error."""
    outcomes: Counter = Counter()

    async def client() -> None:
        while not stop.is_set():
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(REQUEST)
                response = await asyncio.wait_for(reader.read(), 10)
                writer.close()
                outcomes[response.split(b" ", 2)[1].decode() if response else "empty"] += 1
            except OSError as exc:
                outcomes[type(exc).__name__] += 1

    await asyncio.gather(*(client() for _ in range(tasks)))
    return outcomes
