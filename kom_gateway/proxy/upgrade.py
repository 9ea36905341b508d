"""Carrying an admitted Upgrade request: exec, attach, port-forward (SPDY/3.1, WebSocket).

The request came through the same intake as every other (parsed, routed, admitted); it
is carried on a dedicated HTTP/1.1 connection to the chosen group, since these protocols
cannot ride an HTTP/2 stream. The attempt loop and fallback are the exchange's
(`Attempts`); a 101 is handed to the HTTP layer to splice (`switch_protocols`), any other
answer is relayed unchanged (kubectl falls back from WebSocket to SPDY on a non-101).
"""

from __future__ import annotations

import asyncio
import logging
import time

from kom_gateway.config.holder import Active
from kom_gateway.http.stream import Headers, ServerStream
from kom_gateway.kube.requestinfo import RequestInfo
from kom_gateway.overload.admission import Ticket
from kom_gateway.proxy.attempts import Attempts
from kom_gateway.proxy.context import ProxyContext
from kom_gateway.proxy.exchange import CLIENT_CLOSED, answer_status
from kom_gateway.proxy.fallback import Failure
from kom_gateway.proxy.headers import HOP_BY_HOP, answered_by, is_identity_header
from kom_gateway.proxy.outcome import ANSWERED_BY_GATEWAY, Outcome
from kom_gateway.proxy.upstreams import UpstreamEndpoint
from kom_gateway.routing.cutover import Client
from kom_gateway.routing.router import Decision

log = logging.getLogger(__name__)
MAX_RESPONSE_HEAD = 64 * 1024
MAX_ERROR_BODY = 1024 * 1024
# An upgrade keeps Connection/Upgrade; every other hop-by-hop header is still dropped.
_UPGRADE_KEEPS = frozenset({b"connection", b"upgrade"})
# What is not relayed from a non-101 answer (the HTTP layer frames the relayed body).
_NOT_RELAYED = HOP_BY_HOP | {b"content-length"}


class _Failed(Exception):
    def __init__(self, failure: Failure) -> None:
        super().__init__(failure.value)
        self.failure = failure


async def carry_upgrade(
    ctx: ProxyContext,
    stream: ServerStream,
    info: RequestInfo,
    client: Client,
    decision: Decision,
    active: Active,
    ticket: Ticket,
) -> None:
    """Carry one admitted Upgrade request until its session ends; its outcome (101 and
    the session's length, or the answer) is recorded like any request's."""
    started = time.monotonic()
    attempts = Attempts(ctx.upstreams, ctx.metrics, info, stream.method, decision.target)
    status, answerer, endpoint_name = 0, ANSWERED_BY_GATEWAY, ""
    writer: asyncio.StreamWriter | None = None
    try:
        while True:
            endpoint = attempts.pick()
            try:
                if endpoint is None:
                    raise _Failed(Failure.NO_HEALTHY_ENDPOINT)
                reader, writer, status, head = await _open(ctx, active, endpoint, stream)
                break
            except _Failed as exc:
                step = attempts.failed(endpoint, exc.failure)
                if step.retry_group is None:
                    status = step.status
                    extra = answered_by(
                        active.config.answered_by_header, ANSWERED_BY_GATEWAY, attempts.fallback
                    )
                    answer_status(
                        stream, step.status, step.reason, step.message, step.retry_after, extra
                    )
                    return
        answerer, endpoint_name = attempts.group, endpoint.name
        head += answered_by(active.config.answered_by_header, answerer, attempts.fallback)
        if status != 101:
            body = await _read_body(reader, head)
            writer.close()
            relayed = [(n, v) for n, v in head if n.lower() not in _NOT_RELAYED]
            stream.start_response(status, relayed)
            stream.write(body)
            stream.end()
            return
        sessions = ctx.metrics.child(ctx.metrics.in_flight, answerer, "upgrade")
        sessions.inc()
        try:
            ended = asyncio.get_running_loop().create_future()
            stream.on_closed(lambda: ended.done() or ended.set_result(None))
            stream.switch_protocols(head, reader, writer)
            await ended
        finally:
            sessions.dec()
    except asyncio.CancelledError:  # the gateway stops
        status = status or CLIENT_CLOSED
        if writer is not None:
            writer.close()  # ends a splice from our side
        raise
    finally:
        ticket.release()
        ctx.recorder.record(
            Outcome(
                client,
                info,
                decision,
                answerer,
                status,
                time.monotonic() - started,
                endpoint_name,
                fallback=attempts.fallback,
            ),
            attempts.group if answerer == ANSWERED_BY_GATEWAY else None,
        )


async def _open(
    ctx: ProxyContext, active: Active, endpoint: UpstreamEndpoint, stream: ServerStream
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, int, Headers]:
    """Connect, send the request head (identity as for every request), read the answer's
    head: (reader, writer, status, headers with their names as the apiserver wrote them)."""
    spec = endpoint.spec
    try:
        async with asyncio.timeout(active.config.timeouts.connect):
            reader, writer = await asyncio.open_connection(
                spec.host,
                spec.port,
                ssl=ctx.upstreams.upgrade_ssl_context(spec),
                server_hostname=endpoint.server_name if spec.scheme == "https" else None,
                limit=MAX_RESPONSE_HEAD,
            )
    except (OSError, TimeoutError) as exc:
        log.info("upgrade connect to %s failed: %s", endpoint.name, exc)
        endpoint.report_failure(connect_error=True)
        raise _Failed(Failure.CONNECT) from exc
    lines = [f"{stream.method} {stream.target} HTTP/1.1".encode("latin-1")]
    lines.append(b"host: " + endpoint.authority.encode("latin-1"))
    for name, value in stream.headers:
        if is_identity_header(name) or (name in HOP_BY_HOP and name not in _UPGRADE_KEEPS):
            continue
        lines.append(name + b": " + value)
    for name, value in stream.peer.headers if stream.peer is not None else ():
        lines.append(name + b": " + value)
    writer.write(b"\r\n".join(lines) + b"\r\n\r\n")
    try:
        raw = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError) as exc:
        writer.close()
        endpoint.report_failure()
        raise _Failed(Failure.RESET_BEFORE_HEADERS) from exc
    status_line, *header_lines = raw.split(b"\r\n")
    parts = status_line.split(b" ", 2)
    status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 502
    if status >= 500:
        endpoint.report_failure()
    else:
        endpoint.report_success()
    head: Headers = []
    for line in header_lines:
        name, sep, value = line.partition(b":")
        if sep:
            head.append((name.strip(), value.strip()))
    return reader, writer, status, head


async def _read_body(reader: asyncio.StreamReader, head: Headers) -> bytes:
    """A non-101 answer's body (refusals are small; capped at MAX_ERROR_BODY)."""
    fields = {name.lower(): value for name, value in head}
    try:
        if b"chunked" in fields.get(b"transfer-encoding", b"").lower():
            return await _read_chunked(reader)
        if b"content-length" in fields:
            return await reader.readexactly(min(int(fields[b"content-length"]), MAX_ERROR_BODY))
        return await reader.read(MAX_ERROR_BODY)
    except (asyncio.IncompleteReadError, OSError, ValueError):
        return b""


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    parts: list[bytes] = []
    size_total = 0
    while True:
        size = int((await reader.readline()).split(b";")[0].strip() or b"0", 16)
        if size == 0 or size_total + size > MAX_ERROR_BODY:
            await reader.readline()
            return b"".join(parts)
        parts.append(await reader.readexactly(size))
        size_total += size
        await reader.readexactly(2)
