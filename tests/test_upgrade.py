"""HTTP/1.1 Upgrade passthrough for SPDY/3.1 (the exec/attach/port-forward protocol of
kubectl before WebSocket, still its fallback): the gateway routes the request, relays the
101 and splices bytes both ways, whatever they are.

The simulator speaks WebSocket exec only, so the upstream here is a minimal HTTP/1.1
server that does what kube-apiserver's SPDY upgrade does at the byte level: check the
Upgrade request, answer 101 with `Upgrade: SPDY/3.1` and the negotiated
`X-Stream-Protocol-Version`, then carry opaque frames (here: echo them).
"""

from __future__ import annotations

import asyncio

from harness import EVERYONE_CUT_OVER, FAST_HEALTH, Stack, config_text

from kom_gateway.config import load_config_text

SPDY_REQUEST = (
    b"POST /api/v1/namespaces/default/pods/web/exec?command=sh&stdin=true&stdout=true HTTP/1.1\r\n"
    b"Host: gw\r\nUser-Agent: kubectl/v1.31.0 (linux/amd64) kubernetes/abc\r\n"
    b"Connection: Upgrade\r\nUpgrade: SPDY/3.1\r\n"
    b"X-Stream-Protocol-Version: v4.channel.k8s.io\r\n"
    b"X-Stream-Protocol-Version: v3.channel.k8s.io\r\n"
    b"X-Remote-User: system:admin\r\nContent-Length: 0\r\n\r\n"
)
# A SPDY/3.1 control frame header (SYN_STREAM) and arbitrary binary payload.
FRAMES = bytes([0x80, 0x03, 0x00, 0x01, 0x00, 0x00, 0x00, 0x0A]) + bytes(range(256)) * 64


class SpdyUpstream:
    def __init__(self) -> None:
        self.requests: list[bytes] = []

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        self.requests.append(head)
        if head.startswith(b"GET /readyz"):
            writer.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
        else:
            writer.write(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\n"
                         b"Upgrade: SPDY/3.1\r\nX-Stream-Protocol-Version: v4.channel.k8s.io\r\n\r\n")
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.close()


async def test_spdy_exec_is_spliced_through():
    stack = await Stack().start(extra=FAST_HEALTH)
    upstream = SpdyUpstream()
    server = await asyncio.start_server(upstream.serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        # the pod group is served by the SPDY upstream (HTTP/1.1 only; probes far apart)
        ports = {n: g.port for n, g in stack.sim.groups.items()}
        new = config_text({**ports, "pod": port}, EVERYONE_CUT_OVER, "health: {intervalSeconds: 60}\n")
        stack.gateway.holder.apply(load_config_text(new))
        stack.gateway.upstreams.sync(stack.gateway.holder.current.config)

        reader, writer = await asyncio.open_connection("127.0.0.1", stack.port)
        writer.write(SPDY_REQUEST)
        async with asyncio.timeout(10):
            head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101")
        assert b"Upgrade: SPDY/3.1" in head and b"X-Stream-Protocol-Version: v4.channel.k8s.io" in head
        writer.write(FRAMES)
        async with asyncio.timeout(10):
            echoed = await reader.readexactly(len(FRAMES))
        assert echoed == FRAMES  # every byte, both ways, unchanged
        writer.close()

        sent = upstream.requests[-1].decode("latin-1").lower()
        assert "upgrade: spdy/3.1" in sent and "connection: upgrade" in sent
        assert sent.count("x-stream-protocol-version:") == 2  # both offers reach the apiserver
        assert "x-remote-user" not in sent  # the spoofed identity did not
    finally:
        server.close()
        await stack.close()
