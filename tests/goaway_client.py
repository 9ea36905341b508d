"""A load client that treats GOAWAY as Go's HTTP/2 transport (client-go) does, built on
the `h2` library: one connection at a time; after GOAWAY, the streams the server accepted
are read to the end, the ones above its last stream id are retried on a new connection,
and new requests go to a new connection. Anything else that goes wrong is a failure."""

from __future__ import annotations

import asyncio
from collections import Counter

import h2.config
import h2.errors
import h2.events

from kom_gateway.http.h2.conn import GracefulH2Connection

REFUSED = "refused"  # not processed: safe to retry, as Go does


class _Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.conn = GracefulH2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding=None))
        self.conn.initiate_connection()
        self.conn.increment_flow_control_window(16 << 20)
        self.writer.write(self.conn.data_to_send())
        self.results: dict[int, asyncio.Future[object]] = {}
        self.status: dict[int, int] = {}
        self.goaway = False
        self.closed = False
        self.task = asyncio.get_running_loop().create_task(self._read())

    def request(self, path: str) -> asyncio.Future[object]:
        sid = self.conn.get_next_available_stream_id()
        self.conn.send_headers(sid, [(b":method", b"GET"), (b":scheme", b"http"),
                                     (b":authority", b"gw"), (b":path", path.encode()),
                                     (b"user-agent", b"goaway-client/1.0")], end_stream=True)
        self.writer.write(self.conn.data_to_send())
        future = asyncio.get_running_loop().create_future()
        self.results[sid] = future
        return future

    def _settle(self, sid: int, outcome: object) -> None:
        future = self.results.pop(sid, None)
        if future is not None and not future.done():
            future.set_result(outcome)

    async def _read(self) -> None:
        try:
            while data := await self.reader.read(65536):
                for event in self.conn.receive_data(data):
                    if isinstance(event, h2.events.ResponseReceived):
                        self.status[event.stream_id] = int(dict(event.headers)[b":status"])
                    elif isinstance(event, h2.events.DataReceived):
                        self.conn.acknowledge_received_data(
                            event.flow_controlled_length, event.stream_id)
                    elif isinstance(event, h2.events.StreamEnded):
                        self._settle(event.stream_id, self.status.pop(event.stream_id, 0))
                    elif isinstance(event, h2.events.StreamReset):
                        refused = event.error_code == h2.errors.ErrorCodes.REFUSED_STREAM
                        self._settle(event.stream_id, REFUSED if refused else "reset")
                    elif isinstance(event, h2.events.ConnectionTerminated):
                        self.goaway = True
                        for sid in [s for s in self.results if s > event.last_stream_id]:
                            self._settle(sid, REFUSED)
                self.writer.write(self.conn.data_to_send())
        except (ConnectionError, OSError):
            pass
        finally:
            self.closed = True
            for sid in list(self.results):
                self._settle(sid, "connection lost")
            self.writer.close()


class GoawayClient:
    def __init__(self, port: int) -> None:
        self.port = port
        self.connection: _Connection | None = None
        self._all: list[_Connection] = []
        self.outcomes: Counter[object] = Counter()
        self.connections = 0
        self.retries = 0

    async def _usable(self) -> _Connection:
        c = self.connection
        if c is None or c.goaway or c.closed:
            reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
            c = self.connection = _Connection(reader, writer)
            self._all = [old for old in self._all if not old.closed]
            self._all.append(c)
            self.connections += 1
        return c

    async def get(self, path: str) -> object:
        for _ in range(10):
            try:
                outcome = await (await self._usable()).request(path)
            except (ConnectionError, OSError) as exc:
                outcome = f"connect: {exc}"
            if outcome != REFUSED:
                self.outcomes[outcome] += 1
                return outcome
            self.retries += 1
        self.outcomes["refused 10 times"] += 1
        return "refused 10 times"

    async def close(self) -> None:
        for c in self._all:
            c.writer.close()
            c.task.cancel()
        await asyncio.gather(*(c.task for c in self._all), return_exceptions=True)
