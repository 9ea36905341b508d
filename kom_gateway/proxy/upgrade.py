"""HTTP/1.1 Upgrade passthrough: exec, attach, port-forward (SPDY/3.1, WebSocket).

The request is routed like any other, then carried on a dedicated HTTP/1.1 connection to
the chosen group (these protocols cannot ride an HTTP/2 stream). A 101 is relayed and the
bytes are spliced both ways with no idle timeout; any other answer is relayed unchanged
(kubectl falls back from WebSocket to SPDY on a non-101).
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from aiohttp import web
from multidict import CIMultiDict

from kom_gateway.http.h1server import request_tls
from kom_gateway.identity import PeerIdentity
from kom_gateway.kubestatus import status_body
from kom_gateway.proxy.attempts import Attempts
from kom_gateway.proxy.fallback import Failure
from kom_gateway.proxy.headers import HOP_BY_HOP, is_identity_header
from kom_gateway.proxy.outcome import ANSWERED_BY_GATEWAY, Outcome
from kom_gateway.requestinfo import parse_request

if TYPE_CHECKING:
    from kom_gateway.proxy.gateway import Gateway
    from kom_gateway.proxy.upstreams import UpstreamEndpoint

log = logging.getLogger(__name__)
MAX_RESPONSE_HEAD = 64 * 1024
MAX_ERROR_BODY = 1024 * 1024
HIGH_WATER = 1024 * 1024
# An upgrade keeps Connection/Upgrade; every other hop-by-hop header is still dropped.
_UPGRADE_KEEPS = frozenset({b"connection", b"upgrade"})


class UpgradeFailed(Exception):
    def __init__(self, failure: Failure) -> None:
        super().__init__(failure.value)
        self.failure = failure


async def handle_upgrade(gateway: Gateway, request: web.BaseRequest) -> web.StreamResponse:
    info = parse_request(request.method, request.raw_path)
    headers = [(k.lower(), v) for k, v in request.raw_headers]
    _, peer = request_tls(request)
    client = gateway.client_for(headers, request.remote or "", peer)
    decision = gateway.holder.current.router.decide(info, client)
    metrics = gateway.metrics
    attempts = Attempts(gateway.upstreams, metrics, info, request.method, decision.target)
    while True:
        endpoint = attempts.pick()
        try:
            if endpoint is None:
                raise UpgradeFailed(Failure.NO_HEALTHY_ENDPOINT)
            reader, writer, status, head = await _open(gateway, endpoint, request, headers, peer)
            break
        except UpgradeFailed as exc:
            step = attempts.failed(endpoint, exc.failure)
            if step.retry_group is None:
                body = status_body(step.status, step.reason, step.message)
                outcome = Outcome(client, info, decision, ANSWERED_BY_GATEWAY, step.status)
                gateway.recorder.record(outcome, attempts.group)
                return web.Response(
                    status=step.status,
                    body=body,
                    content_type="application/json",
                    headers={"Retry-After": str(step.retry_after or 1)},
                )
    group = attempts.group
    gateway.recorder.record(
        Outcome(client, info, decision, group, status, endpoint=endpoint.name if endpoint else "")
    )
    if status != 101:
        return await _relay_plain(reader, writer, status, head)
    return await _splice(
        request, reader, writer, head, metrics.child(metrics.in_flight, group, "upgrade")
    )


async def _open(
    gateway: Gateway,
    endpoint: UpstreamEndpoint,
    request: web.BaseRequest,
    headers: list,
    peer: PeerIdentity | None,
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, int, CIMultiDict[str]]:
    spec = endpoint.spec
    try:
        async with asyncio.timeout(gateway.holder.current.config.timeouts.connect):
            reader, writer = await asyncio.open_connection(
                spec.host,
                spec.port,
                ssl=gateway.upstreams.upgrade_ssl_context(spec),
                server_hostname=endpoint.server_name if spec.scheme == "https" else None,
                limit=MAX_RESPONSE_HEAD,
            )
    except (OSError, TimeoutError) as exc:
        log.info("upgrade connect to %s failed: %s", endpoint.name, exc)
        endpoint.report_failure(connect_error=True)
        raise UpgradeFailed(Failure.CONNECT) from exc
    lines = [f"{request.method} {request.raw_path} HTTP/1.1", f"Host: {endpoint.authority}"]
    for name, value in headers:
        if is_identity_header(name) or (name in HOP_BY_HOP and name not in _UPGRADE_KEEPS):
            continue
        lines.append(f"{name.decode('latin-1')}: {value.decode('latin-1')}")
    for name, value in peer.headers if peer is not None else ():
        lines.append(f"{name.decode('latin-1')}: {value.decode('latin-1')}")
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
    try:
        raw = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError) as exc:
        writer.close()
        endpoint.report_failure()
        raise UpgradeFailed(Failure.RESET_BEFORE_HEADERS) from exc
    endpoint.report_success()
    status_line, *header_lines = raw.decode("latin-1").split("\r\n")
    parts = status_line.split(" ", 2)
    status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 502
    head: CIMultiDict[str] = CIMultiDict()
    for line in header_lines:
        if ":" in line:
            name, _, value = line.partition(":")
            head.add(name.strip(), value.strip())
    return reader, writer, status, head


async def _relay_plain(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    status: int,
    head: CIMultiDict[str],
) -> web.Response:
    """A non-101 answer, relayed unchanged (bodies of refusals are small)."""
    try:
        if "chunked" in head.get("Transfer-Encoding", "").lower():
            body = await _read_chunked(reader)
        elif "Content-Length" in head:
            body = await reader.readexactly(min(int(head["Content-Length"]), MAX_ERROR_BODY))
        else:
            body = await reader.read(MAX_ERROR_BODY)
    except (asyncio.IncompleteReadError, OSError, ValueError):
        body = b""
    finally:
        writer.close()
    out = CIMultiDict(
        (k, v)
        for k, v in head.items()
        if k.lower().encode() not in HOP_BY_HOP and k.lower() != "content-length"
    )
    return web.Response(status=status, body=body, headers=out)


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    parts = []
    while True:
        size = int((await reader.readline()).split(b";")[0].strip() or b"0", 16)
        if size == 0:
            await reader.readline()
            return b"".join(parts)
        parts.append(await reader.readexactly(size))
        await reader.readexactly(2)


class _ToUpstream:
    """aiohttp payload parser that forwards the client's bytes upstream (after the 101)."""

    def __init__(self, writer: asyncio.StreamWriter, client: asyncio.BaseTransport) -> None:
        self.writer = writer
        self.client = client
        self.closed = asyncio.Event()

    def feed_data(self, data: bytes) -> tuple[bool, bytes]:
        self.writer.write(data)
        if self.writer.transport.get_write_buffer_size() > HIGH_WATER:
            self.client.pause_reading()  # type: ignore[attr-defined]
            asyncio.get_running_loop().create_task(self._resume_when_drained())
        return False, b""

    async def _resume_when_drained(self) -> None:
        try:
            await self.writer.drain()
        finally:
            if not self.client.is_closing():
                self.client.resume_reading()  # type: ignore[attr-defined]

    def feed_eof(self) -> None:
        self.closed.set()
        if self.writer.can_write_eof():
            self.writer.write_eof()


async def _splice(
    request: web.BaseRequest,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    head: CIMultiDict[str],
    in_flight: Any,
) -> web.StreamResponse:
    response = web.StreamResponse(status=101, reason="Switching Protocols")
    for name, value in head.items():
        if name.lower() not in ("content-length", "transfer-encoding", "date", "server"):
            response.headers.add(name, value)
    await response.prepare(request)
    transport = request.transport
    assert transport is not None
    to_upstream = _ToUpstream(writer, transport)
    request.protocol.set_parser(to_upstream)  # type: ignore[arg-type]
    in_flight.inc()
    try:
        while True:
            chunk = await reader.read(65536)
            if not chunk:
                break
            transport.write(chunk)
            if request.protocol.writing_paused:
                await request.protocol._drain_helper()  # what aiohttp's own WebSocket writer does
    except (OSError, asyncio.CancelledError):
        pass
    finally:
        in_flight.dec()
        writer.close()
        if not transport.is_closing():
            transport.close()
    return response
