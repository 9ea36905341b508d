"""One client request carried to an apiserver group, with fallback to default.

An exchange is a state machine driven by callbacks: the client stream's events (body,
gone), the upstream stream's events (response, data, end, reset) and the deadline sweep.
No task and no timer per request (`ProxyContext.expire` sweeps the deadlines): a small
GET costs a few function calls here, which is what lets one process keep up with a
compiled HTTP/2 engine. A task exists only while
an endpoint's first connection is being opened.

Data never waits in a coroutine either: upstream DATA is written to the client with a
callback that acknowledges it upstream once the client took it, so a slow client holds
back only its own stream, and memory per stream is bounded by the upstream stream
window. Request bodies flow the same way in the other direction, and are kept (by
reference) until the response starts, so an attempt that failed can be replayed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence

from kom_gateway.config.holder import Active
from kom_gateway.http.client import (
    RESET_BROKEN,
    RESET_GOAWAY,
    RESET_REFUSED,
    ClientStream,
    ConnectError,
    HTTP2ClientConnection,
    StreamRefused,
)
from kom_gateway.http.stream import Headers, ServerStream
from kom_gateway.kube.requestinfo import RequestInfo
from kom_gateway.kube.status import status_body
from kom_gateway.overload.admission import Ticket
from kom_gateway.proxy.attempts import Attempts
from kom_gateway.proxy.context import ProxyContext
from kom_gateway.proxy.fallback import Failure, falls_back_on_status, holds_response_headers
from kom_gateway.proxy.headers import (
    answered_by,
    downstream_response_headers,
    status_headers,
    upstream_request_headers,
)
from kom_gateway.proxy.outcome import ANSWERED_BY_GATEWAY
from kom_gateway.proxy.upstreams import UpstreamEndpoint
from kom_gateway.proxy.watchframes import WatchFrames
from kom_gateway.routing.cutover import Client
from kom_gateway.routing.router import Decision
from kom_gateway.shadow.reads import ShadowRead

log = logging.getLogger(__name__)

CLIENT_CLOSED = 499  # the status recorded when the client went away first (as nginx)

_FAILURE_OF_RESET = {
    RESET_GOAWAY: Failure.GOAWAY,
    RESET_REFUSED: Failure.REFUSED,
    RESET_BROKEN: Failure.RESET_BEFORE_HEADERS,
}


class _Attempt:
    """Listener for one upstream stream; events of an attempt the exchange has moved
    past (or of a finished exchange) are dropped, their data credited back."""

    __slots__ = ("endpoint", "exchange", "group", "received", "sent", "upstream")

    def __init__(self, exchange: Exchange, endpoint: UpstreamEndpoint, group: str) -> None:
        self.exchange = exchange
        self.endpoint = endpoint
        self.group = group
        self.upstream: ClientStream | None = None
        self.received, self.sent = exchange.ctx.metrics.group_bytes(group)

    def send_chunk(self, chunk: list) -> None:
        """Forward a request-body chunk (as it arrives, or replayed from the buffer once
        the upstream stream opens); acknowledge it to the client once sent upstream."""
        assert self.upstream is not None
        stream = self.exchange.stream
        self.sent.amount += len(chunk[0])

        def sent() -> None:
            if chunk[1]:
                stream.ack_body(chunk[1])
                chunk[1] = 0

        self.upstream.send_data(chunk[0], sent)

    # -- StreamListener (each checks the attempt is still the exchange's current one) ----
    def on_response(self, status: int, headers: Headers) -> None:
        exchange = self.exchange
        if exchange.attempt is self and not exchange.finished:
            exchange.on_upstream_response(self, status, headers)

    def on_data(self, data: bytes, flow_len: int) -> None:
        upstream = self.upstream
        assert upstream is not None
        exchange = self.exchange
        if exchange.attempt is not self or exchange.finished:
            upstream.ack(flow_len)
            return
        if exchange.held is not None:
            exchange.send_held()
        size = len(data)
        self.received.amount += size
        exchange.bytes_out += size
        frames = exchange.frames
        if frames is not None:
            frames.feed(data)
            if not exchange.proven and frames.at_boundary:  # a whole event: it works
                exchange.proven = True
                self.endpoint.report_success()
        ticket = exchange.ticket
        if ticket.protected:  # heartbeats, small: not held to a budget
            exchange.stream.write(data, lambda: upstream.ack(flow_len))
        else:
            key = ticket.client
            buffers = exchange.ctx.buffers
            buffers.hold(key, size)
            exchange.stream.write(data, lambda: buffers.release(key, size, upstream.ack, flow_len))
        shadow = exchange.shadow
        if shadow is not None:  # after the write: the client's flush is queued first
            shadow.default_data(data)

    def on_end(self) -> None:
        exchange = self.exchange
        if exchange.attempt is self and not exchange.finished:
            exchange.on_upstream_end(self)

    def on_reset(self, kind: str, reason: str) -> None:
        exchange = self.exchange
        if exchange.attempt is self and not exchange.finished:
            exchange.on_upstream_reset(self, kind, reason)


class Exchange:
    """Callbacks in, one outcome out: when it finishes, the exchange records itself
    (it has the attributes of `outcome.Finished`)."""

    __slots__ = (
        "_busy",
        "_connecting",
        "_queued",
        "active",
        "answered_by",
        "attempt",
        "attempts",
        "body",
        "body_ended",
        "broken",
        "bytes_in",
        "bytes_out",
        "client",
        "ctx",
        "deadline",
        "decision",
        "duration",
        "endpoint",
        "fallback",
        "finished",
        "frames",
        "held",
        "info",
        "proven",
        "responded",
        "seated",
        "shadow",
        "started",
        "status",
        "stream",
        "ticket",
    )

    def __init__(
        self,
        ctx: ProxyContext,
        stream: ServerStream,
        info: RequestInfo,
        client: Client,
        decision: Decision,
        active: Active,
        ticket: Ticket,
    ) -> None:
        self.ctx = ctx
        self.ticket = ticket  # its admission; released when the exchange finishes
        self.stream = stream
        self.info = info
        self.client = client
        self.decision = decision
        self.active = active  # the config snapshot this request keeps to the end
        self.bytes_out = 0  # response body bytes (for the access log)
        self.attempts = Attempts(ctx.upstreams, ctx.metrics, info, stream.method, decision.target)
        self.body: list[list] | None = []  # [data, unacked flow bytes]; kept for replay
        self.bytes_in = 0  # request body bytes
        self.body_ended = False
        self.attempt: _Attempt | None = None
        self.answered_by = decision.target
        self.status = 0
        self.started = 0.0
        self.deadline = float("inf")  # when the request timeout answers it
        self.responded = False  # the client's response is ours to finish (or was)
        self.finished = False
        self.seated = False  # holds one of its exempt client's seats (clientshare.py)
        self.broken = False  # the upstream failed after the response had started
        self.duration = 0.0  # these three are set when it finishes
        self.endpoint = ""  # the endpoint that answered
        self.fallback: str | None = None
        self.frames: WatchFrames | None = None  # a watch's event boundaries
        # response headers not yet sent (`holds_response_headers`), and whether the
        # answering endpoint was reported healthy yet (at the end of its response, or a
        # watch's first whole event: a response that breaks before is a failure)
        self.held: Headers | None = None
        self.proven = False
        self.shadow: ShadowRead | None = None  # its answer is also asked of a candidate
        self._busy: UpstreamEndpoint | None = None  # counted in its in_flight
        self._connecting: asyncio.Task[HTTP2ClientConnection] | None = None
        self._queued: asyncio.TimerHandle | None = None  # its wait for a seat ends

    def start(self) -> None:
        ctx = self.ctx
        self.started = now = time.monotonic()
        if self.info.is_long_running:
            ctx.long_running[self] = None
        else:
            self.deadline = now + self.active.config.timeouts.request
            ctx.live[self] = None
        stream = self.stream
        stream.set_body_consumer(self)  # which also tells us when the stream closes
        ticket = self.ticket
        if ticket.pending:  # its group is full: wait for a seat, at most max_wait
            ticket.wait(self._admitted)
            if ticket.pending:
                loop = asyncio.get_running_loop()
                self._queued = loop.call_later(ticket.max_wait, self._queue_expired)
            return
        self._admitted()

    def _admitted(self) -> None:
        """It holds its group's seat (at once, or after waiting for one)."""
        if self._queued is not None:
            self._queued.cancel()
            self._queued = None
        ticket = self.ticket
        if ticket.exempt:
            if not self.ctx.buffers.seat(ticket.client, self._seated_later):
                return  # an exempt client over its share waits its turn (never shed)
            self.seated = True
        self._next_attempt()

    def _queue_expired(self) -> None:
        """No seat within the group's max_queue_wait: shed it, as at once before."""
        self._queued = None
        if self.finished or not self.ticket.pending:
            return
        rejection = self.ticket.give_up(time.monotonic())
        m = self.ctx.metrics
        m.child(m.shed, rejection.detail, rejection.reason).inc()
        self._answer(429, "TooManyRequests", rejection.message, rejection.retry_after)
        self._finish()

    def _seated_later(self) -> None:
        """An exempt request that waited got its client's seat."""
        if self.finished:  # answered (timeout) or cancelled while it waited
            self.ctx.buffers.unseat(self.ticket.client)
            return
        self.seated = True
        self._next_attempt()

    # -- choosing where the request goes ---------------------------------------------------
    def _next_attempt(self) -> None:
        """Try endpoints (and groups, as the fallback policy says) until one takes the
        request, one needs a connection opened first, or the client has been answered."""
        attempts = self.attempts
        failure: Failure | None
        while not self.finished:
            endpoint = attempts.pick()
            if endpoint is None:
                failure = Failure.NO_HEALTHY_ENDPOINT
            else:
                self._hold(endpoint)
                conn = endpoint.ready_connection()
                if conn is None:
                    self._connect(endpoint)
                    return
                failure = self._open(endpoint, conn)
                if failure is None:
                    return
            if not self._after_failure(endpoint, failure):
                return

    def _failed(self, endpoint: UpstreamEndpoint | None, failure: Failure) -> None:
        if self._after_failure(endpoint, failure):
            self._next_attempt()

    def _after_failure(self, endpoint: UpstreamEndpoint | None, failure: Failure) -> bool:
        """True if another attempt is to be made; else the client has been answered."""
        self._let_go()
        step = self.attempts.failed(endpoint, failure)
        if step.retry_group is None:
            self._answer(step.status, step.reason, step.message, step.retry_after)
            self._finish()
            return False
        return True

    def _hold(self, endpoint: UpstreamEndpoint) -> None:
        """Count this request in the endpoint's in-flight from the moment it is picked,
        so requests picking while a connection opens see each other."""
        if self._busy is not None:
            self._let_go()
        endpoint.in_flight += 1
        self._busy = endpoint

    def _let_go(self) -> None:
        busy = self._busy
        if busy is not None:
            busy.in_flight -= 1
            self._busy = None

    def _connect(self, endpoint: UpstreamEndpoint) -> None:
        task = asyncio.get_running_loop().create_task(endpoint.connection())
        self._connecting = task
        task.add_done_callback(lambda t: self._connected(endpoint, t))

    def _connected(self, endpoint: UpstreamEndpoint, task: asyncio.Task) -> None:
        self._connecting = None
        if task.cancelled():
            return
        exc = task.exception()
        if self.finished:
            return
        if exc is None:
            conn = task.result()
            if not conn.has_capacity():  # it filled up, or got GOAWAY, meanwhile
                self._connect(endpoint)
                return
            failure = self._open(endpoint, conn)
            if failure is None:
                return
        elif isinstance(exc, ConnectError):
            log.info("connect to %s (%s) failed: %s", endpoint.name, self.attempts.group, exc)
            failure = Failure.CONNECT
        else:
            log.error("connecting to %s failed", endpoint.name, exc_info=exc)
            self._answer(500, "InternalError", "the gateway failed to proxy the request", 1)
            self._finish()
            return
        self._failed(endpoint, failure)

    def _open(self, endpoint: UpstreamEndpoint, conn: HTTP2ClientConnection) -> Failure | None:
        """Send the request on a new stream of `conn`; None when it went."""
        group = self.attempts.group
        attempt = _Attempt(self, endpoint, group)
        self.attempt = attempt
        self.proven = False
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
            attempt.upstream = upstream = conn.open_stream(headers, no_body, attempt)
        except StreamRefused as exc:
            log.info("could not open a stream on %s: %s", endpoint.name, exc)
            return Failure.REFUSED
        if not no_body:
            for chunk in self.body or ():
                attempt.send_chunk(chunk)
            if self.body_ended:
                upstream.end()
        return None

    # -- the upstream's answer ---------------------------------------------------------------
    def on_upstream_response(self, attempt: _Attempt, status: int, headers: Headers) -> None:
        """Response headers arrived. A non-default group's 5xx to a read is not the
        answer (default shares its etcd and can give the right one); anything else is,
        whatever its status (an apiserver's 429 or 4xx is its answer). A short read's
        headers from a non-default group wait for its first body byte, so that a response
        that breaks before any of it reached the client can still fall back."""
        endpoint = attempt.endpoint
        method = self.stream.method
        if status >= 500:
            endpoint.report_failure()
            self.proven = True  # (not a success to report later)
            if falls_back_on_status(status, self.info, method, attempt.group):
                self._abort_upstream()
                log.info(
                    "%s %s: %d from %s, falling back",
                    method,
                    self.stream.target,
                    status,
                    endpoint.name,
                )
                self._failed(endpoint, Failure.UPSTREAM_5XX)
                return
        elif self.info.is_long_running and self.info.verb != "watch":
            endpoint.report_success()  # exec, logs -f: may run for hours
            self.proven = True
        self.status = status
        if holds_response_headers(self.info, method, attempt.group):
            self.held = headers
            return
        self._start_response(attempt, headers)

    def send_held(self) -> None:
        """The first body byte (or the end) of a response whose headers were held."""
        headers = self.held
        self.held = None
        assert headers is not None and self.attempt is not None
        self._start_response(self.attempt, headers)

    def _start_response(self, attempt: _Attempt, headers: Headers) -> None:
        self.body = None  # no replay from here on
        self.responded = True
        if self.shadow is not None:
            self.shadow.default_response(self.status, headers)
        if self.info.verb == "watch" and self.status == 200:
            self.frames = WatchFrames(_content_type(headers))
            self.ctx.metrics.child(self.ctx.metrics.watches, attempt.group).inc()
        out = downstream_response_headers(headers)
        header = self.active.config.answered_by_header
        if header:  # (off: no call on the hot path)
            out += answered_by(header, attempt.group, self.attempts.fallback)
        self.stream.start_response(self.status, out)

    def on_upstream_end(self, attempt: _Attempt) -> None:
        if self.held is not None:
            self.send_held()
        elif not self.responded:  # ended without response headers: as good as a reset
            self.on_upstream_reset(attempt, RESET_BROKEN, "upstream ended the stream unanswered")
            return
        if not self.proven:
            attempt.endpoint.report_success()
        if self.shadow is not None:
            self.shadow.default_end()
        self.stream.end()
        self._finish()

    def on_upstream_reset(self, attempt: _Attempt, kind: str, reason: str) -> None:
        stream = self.stream
        if self.held is not None:  # broke before any of it reached the client: a read
            self.held = None
            log.info("%s %s: %s on %s after its headers", stream.method, stream.target, reason,
                     attempt.endpoint.name)  # fmt: skip
            attempt.endpoint.report_failure()
            self._failed(attempt.endpoint, Failure.RESET_BEFORE_BODY)
            return
        if not self.responded:
            log.info("%s %s: %s on %s", stream.method, stream.target, reason, attempt.endpoint.name)
            failure = _FAILURE_OF_RESET[kind]
            if not failure.unsent:  # "not processed, try again" is not ill health
                attempt.endpoint.report_failure()
            self._failed(attempt.endpoint, failure)
            return
        # The response had started: never write an error into a 200 stream. A watch cut
        # between two events ends cleanly (the client re-watches from its last
        # resourceVersion and lands on a healthy group); cut inside an event, or any
        # other response cut short, it is reset so the client sees the break. Either way
        # the endpoint failed it: a broken response counts toward its ejection.
        frames = self.frames
        if frames is not None and frames.at_boundary:
            stream.end()
        else:
            stream.reset()
        self.broken = True
        attempt.endpoint.report_failure()
        metrics = self.ctx.metrics
        metrics.child(metrics.broken_responses, attempt.group, self.info.verb).inc()
        self._finish()

    # -- the client's side -------------------------------------------------------------------
    def on_body(self, data: bytes, flow_len: int) -> None:
        if self.finished:  # already answered (413): the rest of the body is dropped
            self.stream.ack_body(flow_len)
            return
        self.bytes_in += len(data)
        if self.bytes_in > self.active.config.limits.max_request_body_bytes:
            self._fail_body_too_large()
            return
        chunk = [data, flow_len]
        if self.body is not None:
            self.body.append(chunk)
        attempt = self.attempt
        if attempt is not None and attempt.upstream is not None:
            attempt.send_chunk(chunk)

    def on_body_end(self) -> None:
        self.body_ended = True
        attempt = self.attempt
        if attempt is not None and attempt.upstream is not None and not self.finished:
            attempt.upstream.end()

    def _fail_body_too_large(self) -> None:
        limit = self.active.config.limits.max_request_body_bytes
        self._abort_upstream()
        if not self.responded:
            self._answer(
                413,
                "RequestEntityTooLarge",
                f"the request body is larger than the limit of {limit} bytes",
                None,
            )
        else:
            self.stream.reset()
        self._finish()

    def on_stream_closed(self) -> None:
        """The client's stream closed: after our answer, nothing to do; before it, the
        client went away: stop working on its behalf (and cancel upstream)."""
        if not self.finished:
            self.cancel()

    def timed_out(self) -> None:
        """The request timeout passed (the deadline sweep calls this)."""
        if self.finished:
            return
        self._abort_upstream()
        if not self.responded:
            if self.attempt is not None:  # no answer in time: ill health, as a 5xx
                self.attempt.endpoint.report_failure()
            self._answer(
                504, "Timeout", "Timeout: request did not complete within the allotted timeout", 1
            )
        else:
            self.stream.reset()
        self._finish()

    def cancel(self) -> None:
        """Stop now (the client left, or the gateway stops): upstream is reset."""
        if self.finished:
            return
        self._abort_upstream()
        if not self.stream.closed:
            self.stream.reset()
        self.status = self.status or CLIENT_CLOSED
        self._finish()

    def end_cleanly(self) -> None:
        """Shutdown: end the client's response here (a watch ends as if the apiserver
        closed it, so the client re-watches) and stop the upstream side."""
        if self.finished:
            return
        self._abort_upstream()
        if self.responded:
            if self.info.is_long_running:
                self.stream.end()
            else:
                self.stream.reset()  # a body cut short must not look complete
        else:
            self._answer(503, "ServiceUnavailable", "the gateway is shutting down", 1)
        self._finish()

    # -- ending ------------------------------------------------------------------------------
    def _abort_upstream(self) -> None:
        """RST the upstream stream (a no-op if it already ended)."""
        attempt = self.attempt
        if attempt is not None and attempt.upstream is not None:
            attempt.upstream.cancel()

    def _answer(self, status: int, reason: str, message: str, retry_after: int | None) -> None:
        self.held = None
        self.status = status
        self.responded = True
        self.attempt = None  # no upstream answered this
        extra = answered_by(
            self.active.config.answered_by_header, ANSWERED_BY_GATEWAY, self.attempts.fallback
        )
        answer_status(self.stream, status, reason, message, retry_after, extra)

    def _finish(self) -> None:
        """Exactly once, whichever way the exchange ended: give back its admission and
        endpoint slot, and record its outcome."""
        if self.finished:
            return
        self.finished = True
        ctx = self.ctx
        if self.info.is_long_running:
            del ctx.long_running[self]
        else:
            del ctx.live[self]
        if self._connecting is not None:
            self._connecting.cancel()
        if self._queued is not None:
            self._queued.cancel()
        self._let_go()
        ticket = self.ticket
        ticket.release()
        if self.seated:
            ctx.buffers.unseat(ticket.client)
        if self.frames is not None:
            ctx.metrics.child(ctx.metrics.watches, self.answered_by).dec()
        attempt = self.attempt
        self.endpoint = attempt.endpoint.name if attempt is not None else ""
        self.fallback = self.attempts.fallback
        self.duration = time.monotonic() - self.started
        shadow = self.shadow
        if shadow is not None:
            self.shadow = None
            shadow.exchange_finished(self.duration)
        ctx.recorder.record(self)
        self.attempt = None  # exchange <-> attempt: freed by refcount, not the cyclic GC


def _content_type(headers: Headers) -> bytes:
    for name, value in headers:
        if name == b"content-type":
            return value
    return b""


def answer_status(
    stream: ServerStream,
    status: int,
    reason: str,
    message: str,
    retry_after: int | None = None,
    extra: Sequence[tuple[bytes, bytes]] = (),
) -> None:
    """Answer with a Kubernetes Status body (what client-go understands and retries)."""
    body = status_body(status, reason, message)
    stream.start_response(status, [*status_headers(body, retry_after), *extra])
    stream.write(body)
    stream.end()
