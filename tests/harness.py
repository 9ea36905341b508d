"""In-process test stack: simulated groups + the gateway on free 127.0.0.1 ports, and a
small HTTP/2 client (the gateway's own upstream connection) to drive it."""

from __future__ import annotations

import asyncio
import json
import ssl
from dataclasses import dataclass, field

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
from hyperframe.frame import Frame, GoAwayFrame

from kom_gateway.config import ConfigHolder, load_config_text
from kom_gateway.http.client import ClientStream
from kom_gateway.http.h2.client import H2ClientConnection
from kom_gateway.http.h2.conn import GracefulH2Connection
from kom_gateway.http.listener import Listener
from kom_gateway.http.settings import H2ClientSettings
from kom_gateway.proxy.gateway import Gateway
from kom_gateway.server.run import new_listener
from kom_gateway.sim.server import Simulator

GROUPS = ("default", "pod", "config", "event")
CLAIMS = {
    "pod": ["pods", "bindings"],
    "config": ["nodes", "configmaps", "secrets", "leases.coordination.k8s.io"],
    "event": ["events", "events.events.k8s.io"],
}


def config_text(ports: dict[str, int | list[int]], cutover: str, extra: str = "") -> str:
    """A gateway config for simulated groups (a list of ports: that many endpoints)."""
    lines = ["groups:"]
    for name, port in ports.items():
        endpoints = ", ".join(f'"http://127.0.0.1:{p}"' for p in ([port] if isinstance(port, int) else port))
        lines.append(f"  {name}:")
        lines.append(f"    endpoints: [{endpoints}]")
        if name in CLAIMS:
            lines.append(f"    resources: {json.dumps(CLAIMS[name])}")
    return "\n".join(lines) + "\n" + cutover + extra


EVERYONE_CUT_OVER = """cutover:
  - match: {userAgent: "legacy/*"}
  - percent: {pod: 100, config: 100, event: 100}
"""
FAST_HEALTH = ("health: {intervalSeconds: 0.2, timeoutSeconds: 0.5, failureThreshold: 2, "
               "consecutiveFailures: 2, baseEjectionSeconds: 1}\n")


REQUEST = [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"gw"),
           (b":path", b"/api/v1/namespaces/default/configmaps"), (b"user-agent", b"raw/1.0")]


class RawH2:
    """A bare h2 client: frames are sent exactly as a test says, however rude."""

    def __init__(self, reader, writer) -> None:
        self.reader, self.writer = reader, writer
        # h2 reads nothing after a GOAWAY; a real client (Go, nghttp2) still reads the
        # streams the server promised to finish, so this one does too
        self.conn = GracefulH2Connection(h2.config.H2Configuration(
            client_side=True, validate_outbound_headers=False, normalize_outbound_headers=False))
        self.conn.initiate_connection()
        self.flush()

    @classmethod
    async def connect(cls, port: int) -> RawH2:
        return cls(*await asyncio.open_connection("127.0.0.1", port))

    def flush(self) -> None:
        self.writer.write(self.conn.data_to_send())

    def rapid_reset(self, count: int) -> None:
        """Open `count` streams and cancel each at once (CVE-2023-44487)."""
        for _ in range(count):
            stream_id = self.conn.get_next_available_stream_id()
            self.conn.send_headers(stream_id, REQUEST, end_stream=True)
            self.conn.reset_stream(stream_id)
        self.flush()

    def send(self, path: str, method: str = "GET", user_agent: bytes = b"raw/1.0") -> int:
        """Open a request stream (no body); its stream id."""
        stream_id = self.conn.get_next_available_stream_id()
        headers = [(b":method", method.encode()), (b":scheme", b"http"), (b":authority", b"gw"),
                   (b":path", path.encode()), (b"user-agent", user_agent)]
        self.conn.send_headers(stream_id, headers, end_stream=True)
        self.flush()
        return stream_id

    async def events(self, timeout: float = 5) -> list[h2.events.Event]:
        """The events of the next read ([] when the server closed); answers PINGs and
        opens windows as a well-behaved client does."""
        async with asyncio.timeout(timeout):
            data = await self.reader.read(65536)
        if not data:
            return []
        events = self.conn.receive_data(data)
        for event in events:
            if isinstance(event, h2.events.DataReceived):
                self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        self.flush()  # h2 queued the PING ACKs
        return events

    async def until_closed(self, timeout: float = 10) -> h2.events.ConnectionTerminated | None:
        """Read until the server closes; its last GOAWAY, if it sent one. Frames are
        parsed, not fed to our state machine: a server may reset streams this client
        wrote as raw frames, which h2 would refuse (and drop the GOAWAY after them)."""
        received = b""
        async with asyncio.timeout(timeout):
            while True:
                try:
                    data = await self.reader.read(65536)
                except ConnectionResetError:  # closed with our flood still unread: RST
                    break
                if not data:
                    break
                received += data
        self.writer.close()
        goaway = None
        while len(received) >= 9:
            frame, length = Frame.parse_frame_header(memoryview(received[:9]))
            if len(received) < 9 + length:
                break
            if isinstance(frame, GoAwayFrame):
                frame.parse_body(memoryview(received[9:9 + length]))
                goaway = h2.events.ConnectionTerminated()
                goaway.error_code = h2.errors.ErrorCodes(frame.error_code)
                goaway.last_stream_id = frame.last_stream_id
                goaway.additional_data = frame.additional_data
            received = received[9 + length:]
        return goaway


@dataclass
class Response:
    status: int
    headers: dict[bytes, bytes]
    body: bytes
    reset: bool = False

    @property
    def group(self) -> str:
        return self.headers.get(b"x-kom-sim-group", b"").decode()

    def json(self) -> dict:
        return json.loads(self.body)


@dataclass
class Collector:
    """StreamListener that gathers a response; `auto_ack` False simulates a stalled reader."""

    auto_ack: bool = True
    status: int = 0
    headers: dict[bytes, bytes] = field(default_factory=dict)
    chunks: list[bytes] = field(default_factory=list)
    unacked: int = 0
    reset: bool = False
    stream: ClientStream | None = None
    done: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    got_headers: asyncio.Event = field(default_factory=asyncio.Event)
    got_data: asyncio.Event = field(default_factory=asyncio.Event)

    def on_response(self, status, headers):
        self.status = status
        self.headers = dict(headers)
        self.got_headers.set()

    def on_data(self, data, flow_len):
        self.chunks.append(data)
        self.got_data.set()
        if self.auto_ack:
            self.stream.ack(flow_len)
        else:
            self.unacked += flow_len

    def on_end(self):
        if not self.done.done():
            self.done.set_result(None)

    def on_reset(self, kind, reason):
        self.reset = True
        if not self.done.done():
            self.done.set_result(None)

    def response(self) -> Response:
        return Response(self.status, self.headers, b"".join(self.chunks), self.reset)


class Client:
    def __init__(self, conn: H2ClientConnection, port: int) -> None:
        self.conn = conn
        self.port = port

    def open(self, method: str, path: str, user_agent: str = "kubectl/v1.31.0", body: bytes = b"",
             headers: list[tuple[bytes, bytes]] = (), collector: Collector | None = None) -> Collector:
        collector = collector or Collector()
        hdrs = [(b":method", method.encode()), (b":scheme", b"http"),
                (b":authority", f"127.0.0.1:{self.port}".encode()), (b":path", path.encode()),
                (b"user-agent", user_agent.encode()), *headers]
        if body:
            hdrs.append((b"content-type", b"application/json"))
        collector.stream = self.conn.open_stream(hdrs, not body, collector)
        if body:
            collector.stream.send_data(body)
            collector.stream.end()
        return collector

    async def request(self, method: str, path: str, timeout: float = 10, **kwargs) -> Response:
        collector = self.open(method, path, **kwargs)
        async with asyncio.timeout(timeout):
            await collector.done
        return collector.response()

    async def close(self):
        self.conn.close()


class Stack:
    def __init__(self, sim_h2_settings=None) -> None:
        self.sim = Simulator(bookmark_interval=0.2, h2_settings=sim_h2_settings)
        self.listener: Listener | None = None
        self.gateway: Gateway | None = None
        self.port = 0
        self.clients: list[Client] = []

    async def start(self, cutover: str = EVERYONE_CUT_OVER, extra: str = FAST_HEALTH,
                    replicas: dict[str, int] | None = None,
                    tls: ssl.SSLContext | None = None) -> Stack:
        """`replicas`: groups with more than one apiserver; the second of "pod" is the
        simulated group "pod-1" (same store, its own faults), and so on. `tls`: the
        listener's context (clients then connect with `client(tls=...)`)."""
        ports: dict[str, int | list[int]] = {}
        for name in GROUPS:
            group = await self.sim.add_group(name, "127.0.0.1", 0)
            ports[name] = [group.port]
            for i in range(1, (replicas or {}).get(name, 1)):
                ports[name].append((await self.sim.add_group(f"{name}-{i}", "127.0.0.1", 0)).port)
        self.config_text = config_text(ports, cutover, extra)
        config = load_config_text(self.config_text)
        self.gateway = Gateway(ConfigHolder(config))
        self.listener = new_listener(self.gateway, tls)
        self.port = await self.listener.start("127.0.0.1", 0)
        return self

    async def client(self, stream_window: int = 256 * 1024,
                     tls: ssl.SSLContext | None = None) -> Client:
        conn = await H2ClientConnection.connect(
            "127.0.0.1", self.port, H2ClientSettings(stream_window=stream_window), tls)
        client = Client(conn, self.port)
        self.clients.append(client)
        return client

    def store_watchers(self) -> int:
        return len(self.sim.store.watchers)

    def served(self, group: str) -> int:
        return sum(self.sim.groups[group].served.values())

    async def close(self) -> None:
        for client in self.clients:
            await client.close()
        if self.gateway is not None:
            self.gateway.abort_all()
        if self.listener is not None:
            await self.listener.close()
        if self.gateway is not None:
            await self.gateway.close()
        await self.sim.close()
