"""One client request carried to an apiserver group, with fallback to default.

One task per request waits for what must be waited for (a connection, the response
headers, the end). Data never waits in a coroutine: upstream DATA is written to the
client with a callback that acknowledges it upstream once the client took it, so a slow
client holds back only its own stream, and memory per stream is bounded by the upstream
stream window. Request bodies flow the same way in the other direction, and are kept
(by reference) until the response starts, so an attempt that failed can be replayed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from kom_gateway.config.holder import Active
from kom_gateway.http.client import (
    RESET_BROKEN,
    RESET_GOAWAY,
    RESET_REFUSED,
    ClientStream,
    ConnectError,
    StreamRefused,
)
from kom_gateway.http.stream import Headers, ServerStream
from kom_gateway.kubestatus import status_body
from kom_gateway.overload.admission import Ticket
from kom_gateway.proxy.accesslog import access_record
from kom_gateway.proxy.attempts import Attempts
from kom_gateway.proxy.fallback import Failure
from kom_gateway.proxy.headers import (
    downstream_response_headers,
    status_headers,
    upstream_request_headers,
)
from kom_gateway.proxy.upstreams import UpstreamEndpoint
from kom_gateway.requestinfo import RequestInfo
from kom_gateway.routing.cutover import Client
from kom_gateway.routing.router import Decision

if TYPE_CHECKING:
    from kom_gateway.proxy.gateway import Gateway

log = logging.getLogger(__name__)


_FAILURE_OF_RESET = {
    RESET_GOAWAY: Failure.GOAWAY,
    RESET_REFUSED: Failure.REFUSED,
    RESET_BROKEN: Failure.RESET_BEFORE_HEADERS,
}


class _Attempt:
    """Listener for one upstream stream."""

    __slots__ = ("done", "endpoint", "exchange", "group", "headers", "received", "upstream")

    def __init__(self, exchange: Exchange, endpoint: UpstreamEndpoint, group: str) -> None:
        loop = asyncio.get_running_loop()
        self.exchange = exchange
        self.endpoint = endpoint
        self.group = group
        self.headers: asyncio.Future[tuple[int, Headers] | Failure] = loop.create_future()
        self.done: asyncio.Future[None] = loop.create_future()
        self.upstream: ClientStream | None = None
        metrics = exchange.gateway.metrics
        self.received = metrics.child(metrics.received_bytes, group)

    def send_chunk(self, chunk: list) -> None:
        """Forward a request-body chunk; acknowledge it to the client once sent upstream."""
        assert self.upstream is not None
        stream = self.exchange.stream

        def sent() -> None:
            if chunk[1]:
                stream.ack_body(chunk[1])
                chunk[1] = 0

        self.upstream.send_data(chunk[0], sent)

    # -- StreamListener ------------------------------------------------------------------
    def on_response(self, status: int, headers: Headers) -> None:
        if not self.headers.done():
            # Start the client's response now: DATA may follow in the same read, before
            # the exchange task runs again.
            self.exchange.on_upstream_response(self, status, headers)
            self.headers.set_result((status, headers))

    def on_data(self, data: bytes, flow_len: int) -> None:
        upstream = self.upstream
        assert upstream is not None
        self.received.inc(len(data))
        self.exchange.bytes_out += len(data)
        self.exchange.stream.write(data, lambda: upstream.ack(flow_len))

    def on_end(self) -> None:
        self.exchange.completed = True
        self.exchange.stream.end()
        if not self.headers.done():  # ended without headers: treat as a reset
            self.headers.set_result(Failure.RESET_BEFORE_HEADERS)
        if not self.done.done():
            self.done.set_result(None)

    def on_reset(self, kind: str, reason: str) -> None:
        if not self.headers.done():
            self.headers.set_result(_FAILURE_OF_RESET[kind])
            log.info(
                "%s %s: %s on %s",
                self.exchange.stream.method,
                self.exchange.stream.target,
                reason,
                self.endpoint.name,
            )
            return
        # The response had started: never write an error into a 200 stream. A watch ends
        # cleanly (the client re-watches and lands on a healthy group); anything else is
        # reset so the client sees the break instead of a truncated body.
        self.exchange.completed = True
        if self.exchange.info.verb == "watch":
            self.exchange.stream.end()
        else:
            self.exchange.stream.reset()
        metrics = self.exchange.gateway.metrics
        metrics.child(metrics.broken_responses, self.group, self.exchange.info.verb).inc()
        if not self.done.done():
            self.done.set_result(None)


class Exchange:
    def __init__(
        self,
        gateway: Gateway,
        stream: ServerStream,
        info: RequestInfo,
        client: Client,
        decision: Decision,
        active: Active,
        ticket: Ticket,
    ) -> None:
        self.gateway = gateway
        self.ticket = ticket  # its admission; released by the gateway when the task ends
        self.stream = stream
        self.info = info
        self.client = client
        self.bytes_out = 0  # response body bytes (for the access log)
        self.attempts: Attempts | None = None  # set when the request goes upstream
        self.decision = decision
        self.active = active
        self.body: list[list] | None = []  # [data, unacked flow bytes]; kept for replay
        self.body_size = 0
        self.body_ended = False
        self.attempt: _Attempt | None = None
        self.answered_by = decision.target
        self.status = 0
        self.task: asyncio.Task[None] | None = None  # set by the gateway
        self.completed = False  # the client's response has been ended (or reset) by us
        self._finished = False

    # -- BodyConsumer ----------------------------------------------------------------------
    def on_body(self, data: bytes, flow_len: int) -> None:
        if self.completed:  # already answered (413): the rest of the body is dropped
            self.stream.ack_body(flow_len)
            return
        self.body_size += len(data)
        if self.body_size > self.active.config.limits.max_request_body_bytes:
            self._fail_body_too_large()
            return
        chunk = [data, flow_len]
        if self.body is not None:
            self.body.append(chunk)
        attempt = self.attempt
        if attempt is not None and attempt.upstream is not None:
            attempt.send_chunk(chunk)
            metrics = self.gateway.metrics
            metrics.child(metrics.sent_bytes, attempt.group).inc(len(data))

    def on_body_end(self) -> None:
        self.body_ended = True
        attempt = self.attempt
        if attempt is not None and attempt.upstream is not None:
            attempt.upstream.end()

    def _fail_body_too_large(self) -> None:
        limit = self.active.config.limits.max_request_body_bytes
        self.completed = True
        if not self.stream.response_started:
            self._respond(
                413,
                "RequestEntityTooLarge",
                f"the request body is larger than the limit of {limit} bytes",
                None,
            )
        else:
            self.stream.reset()
        self._abort_upstream()
        if self.task is not None and not self.task.done():
            self.task.cancel()  # nothing left to wait for upstream

    # -- the request's life ----------------------------------------------------------------
    async def run(self) -> None:
        stream = self.stream
        stream.on_closed(self._client_closed)
        stream.set_body_consumer(self)
        metrics = self.gateway.metrics
        started = time.monotonic()
        timeout = None if self.info.is_long_running else self.active.config.timeouts.request
        try:
            async with asyncio.timeout(timeout):
                await self._carry()
        except TimeoutError:
            self.completed = True
            self._abort_upstream()
            if not stream.response_started:
                self._respond(
                    504,
                    "Timeout",
                    "Timeout: request did not complete within the allotted timeout",
                    1,
                )
            else:
                stream.reset()
        except asyncio.CancelledError:  # the client went away (or the gateway stops)
            self._abort_upstream()
            self.status = self.status or 499  # client closed the request
        except Exception:
            log.exception("proxying %s %s failed", stream.method, stream.target)
            self._abort_upstream()
            if not stream.response_started:
                self._respond(500, "InternalError", "the gateway failed to proxy the request", 1)
            else:
                stream.reset()
        finally:
            self._finished = True
            metrics.child(
                metrics.requests,
                self.answered_by,
                self.info.verb,
                self.info.resource,
                str(self.status),
            ).inc()
            duration = time.monotonic() - started
            if not self.info.is_long_running:
                metrics.child(metrics.duration, self.answered_by, self.info.verb).observe(duration)
            access = self.gateway.access_log
            fallback = self.attempts.fallback if self.attempts else None
            if access.wants(self.status, fallback):
                attempt = self.attempt
                access.write(
                    access_record(
                        time.time() - duration,
                        self.client,
                        self.info,
                        self.decision,
                        self.answered_by,
                        attempt.endpoint.name if attempt else "",
                        self.status,
                        duration,
                        self.body_size,
                        self.bytes_out,
                        fallback,
                    )
                )

    async def _carry(self) -> None:
        gateway = self.gateway
        attempts = Attempts(
            gateway.upstreams, gateway.metrics, self.info, self.stream.method, self.decision.target
        )
        self.attempts = attempts
        while True:
            endpoint = attempts.pick()
            if endpoint is None:
                failure: Failure | None = Failure.NO_HEALTHY_ENDPOINT
            else:
                failure = await self._try(endpoint, attempts.group)
                if failure is None:
                    return
            step = attempts.failed(endpoint, failure)
            if step.retry_group is None:
                self._respond(step.status, step.reason, step.message, step.retry_after)
                return

    async def _try(self, endpoint: UpstreamEndpoint, group: str) -> Failure | None:
        """One attempt; None when the response was carried (whatever its status).
        Counted in the endpoint's in-flight from the moment it was picked, so requests
        picking while a connection opens see each other."""
        endpoint.in_flight += 1
        try:
            return await self._try_counted(endpoint, group)
        finally:
            endpoint.in_flight -= 1

    async def _try_counted(self, endpoint: UpstreamEndpoint, group: str) -> Failure | None:
        try:
            conn = await endpoint.connection()
            while not conn.has_capacity():  # it filled up, or got GOAWAY, while we waited
                conn = await endpoint.connection()
        except ConnectError as exc:
            log.info("connect to %s (%s) failed: %s", endpoint.name, group, exc)
            return Failure.CONNECT
        attempt = _Attempt(self, endpoint, group)
        self.attempt = attempt
        self.answered_by = group
        stream = self.stream
        headers = upstream_request_headers(
            stream.method,
            endpoint.spec.scheme,
            endpoint.authority,
            stream.target,
            stream.headers,
            stream.peer.headers if stream.peer is not None else (),
        )
        no_body = self.body_ended and not self.body
        try:
            attempt.upstream = conn.open_stream(headers, no_body, attempt)
        except StreamRefused as exc:
            log.info("could not open a stream on %s: %s", endpoint.name, exc)
            return Failure.REFUSED
        if not no_body:
            for chunk in self.body or ():
                attempt.send_chunk(chunk)
            if self.body_ended:
                attempt.upstream.end()
        outcome = await attempt.headers
        if isinstance(outcome, Failure):
            if not outcome.unsent:  # "not processed, try again" is not ill health
                endpoint.report_failure()
            return outcome
        is_watch = self.info.verb == "watch"
        if is_watch:
            self.gateway.metrics.watches.labels(group).inc()
        try:
            await attempt.done
        finally:
            if is_watch:
                self.gateway.metrics.watches.labels(group).dec()
        return None

    def on_upstream_response(self, attempt: _Attempt, status: int, headers: Headers) -> None:
        """Response headers arrived: this attempt answers the request, whatever its status
        (an apiserver's 429 or 5xx is its answer, never a reason to fall back)."""
        attempt.endpoint.report_success()
        self.status = status
        self.body = None  # no replay from here on
        self.stream.start_response(status, downstream_response_headers(headers))

    def _client_closed(self) -> None:
        """The client went away: stop waiting on its behalf (and cancel upstream)."""
        if self.completed or self._finished:
            return
        if self.task is not None and not self.task.done():
            self.task.cancel()

    def _abort_upstream(self) -> None:
        """RST the upstream stream (a no-op if it already ended). Not keyed on
        `attempt.done`: cancelling the task cancels that future too."""
        attempt = self.attempt
        if attempt is not None and attempt.upstream is not None:
            attempt.upstream.cancel()

    def _respond(self, status: int, reason: str, message: str, retry_after: int | None) -> None:
        self.completed = True
        self.status = status
        answer_status(self.stream, status, reason, message, retry_after)

    def end_cleanly(self) -> None:
        """Shutdown: end the client's response here (a watch ends as if the apiserver
        closed it, so the client re-watches) and stop the upstream side."""
        if self.completed:
            return
        self.completed = True
        self._abort_upstream()
        if self.stream.response_started:
            if self.info.is_long_running:
                self.stream.end()
            else:
                self.stream.reset()  # a body cut short must not look complete
        else:
            self._respond(503, "ServiceUnavailable", "the gateway is shutting down", 1)
        if self.task is not None and not self.task.done():
            self.task.cancel()


def answer_status(
    stream: ServerStream, status: int, reason: str, message: str, retry_after: int | None = None
) -> None:
    """Answer with a Kubernetes Status body (what client-go understands and retries)."""
    body = status_body(status, reason, message)
    stream.start_response(status, status_headers(body, retry_after))
    stream.write(body)
    stream.end()
