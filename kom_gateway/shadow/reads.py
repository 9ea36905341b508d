"""Shadow reads, the I/O shell: which reads are shadowed, the candidate's request, the
verdict counted and (a sample of mismatches) logged.

A shadowed read is an ordinary exchange to default that also feeds a `ShadowRead`: its
response passes through a summary as it streams to the client (nothing is held). Once
default's answer is complete, the candidate is asked the exact same question
(`compare.candidate_target`) on its own upstream stream, with the client's identity,
and its answer is summarised the same way and judged. The client never waits for any of
it: it has had default's answer already.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from typing import TYPE_CHECKING

from kom_gateway.http.client import (
    RESET_BROKEN,
    ClientStream,
    ConnectError,
    HTTP2ClientConnection,
    StreamRefused,
)
from kom_gateway.http.stream import Headers
from kom_gateway.proxy.headers import upstream_request_headers
from kom_gateway.routing.cutover import CutoverRule, ShadowSpec
from kom_gateway.shadow.compare import (
    ERROR,
    MATCH,
    MISMATCH,
    SKIPPED,
    Verdict,
    candidate_target,
    judge,
)
from kom_gateway.shadow.gate import ShadowGate
from kom_gateway.shadow.summary import Summary, SummaryBuilder
from kom_gateway.tokenbucket import TokenBucket

if TYPE_CHECKING:
    from kom_gateway.kube.requestinfo import RequestInfo
    from kom_gateway.proxy.metrics import Metrics
    from kom_gateway.proxy.upstreams import UpstreamEndpoint, Upstreams

log = logging.getLogger(__name__)

SHADOWED_SUBRESOURCES = ("", "status", "scale")  # reads of stored state (not logs, proxies)
MAX_TIMEOUT = 30.0  # a candidate slower than this is an error, whatever requestSeconds is
MISMATCH_LOG_RATE = 0.1  # mismatch lines per second, after a burst of MISMATCH_LOG_BURST
MISMATCH_LOG_BURST = 5


class ShadowReads:
    """This process's shadow reads (budgets are per process, as every limit here)."""

    def __init__(self, upstreams: Upstreams, metrics: Metrics) -> None:
        self.upstreams = upstreams
        self.metrics = metrics
        self.load = 0.0  # this replica's, set by the load sampler
        self.live: set[ShadowRead] = set()
        self._gates: dict[tuple[str, ShadowSpec], ShadowGate] = {}
        self._log_budget = TokenBucket(MISMATCH_LOG_RATE, MISMATCH_LOG_BURST, time.monotonic())
        self._unlogged = 0

    def sample(
        self,
        rule: CutoverRule,
        info: RequestInfo,
        method: str,
        target: str,
        headers: Headers,
        identity: Headers,
        timeout: float,
    ) -> ShadowRead | None:
        """A shadow for this read of `rule`'s client (still on default), or None: not a
        read that is shadowed, not in the sample, or over a budget (counted skipped)."""
        spec = rule.shadow
        if (
            spec is None
            or method != "GET"
            or info.is_long_running
            or info.verb not in ("get", "list")
            or info.subresource not in SHADOWED_SUBRESOURCES
        ):
            return None
        gate = self._gate(rule.label, spec)
        if not gate.sampled(random.random()):
            return None
        candidate_up = self.upstreams.has_candidates(spec.group, set())
        why = gate.admit(time.monotonic(), self.load, candidate_up)
        if why:
            self.count(rule.label, spec.group, SKIPPED, why)
            return None
        read = ShadowRead(
            self, gate, rule.label, info.verb, target, headers, identity, min(timeout, MAX_TIMEOUT)
        )
        self.live.add(read)
        return read

    def _gate(self, label: str, spec: ShadowSpec) -> ShadowGate:
        key = (label, spec)
        gate = self._gates.get(key)
        if gate is None:
            if len(self._gates) > 1024:  # rules come and go with reloads
                self._gates = {k: g for k, g in self._gates.items() if g.in_flight}
            gate = self._gates[key] = ShadowGate(spec, time.monotonic())
        return gate

    def count(self, rule: str, group: str, result: str, reason: str) -> None:
        m = self.metrics
        m.count(m.child(m.shadow_requests, rule, group, result, reason))

    def finished(self, read: ShadowRead, verdict: Verdict, candidate_seconds: float) -> None:
        """A shadow read's end: counted; a compared one's two latencies observed; a
        mismatch logged while the log budget lasts."""
        self.live.discard(read)
        read.gate.release()
        group = read.gate.spec.group
        self.count(read.rule, group, verdict.result, verdict.reason)
        if verdict.result in (MATCH, MISMATCH):
            m = self.metrics
            m.add((), (m.child(m.shadow_duration, group),), candidate_seconds)
            m.add((), (m.child(m.shadow_default_duration, group),), read.default_seconds)
        if verdict.result == MISMATCH:
            if self._log_budget.take(time.monotonic()) > 0.0:
                self._unlogged += 1
                return
            more = f" ({self._unlogged} more not logged)" if self._unlogged else ""
            self._unlogged = 0
            log.warning(
                "shadow read mismatch (%s): rule %s, GET %s: default answered %s, %s answered "
                "%s to GET %s%s",
                verdict.reason,
                read.rule,
                read.target,
                read.default_said,
                group,
                read.candidate_said,
                read.candidate_target,
                more,
            )

    def close(self) -> None:
        for read in list(self.live):
            read.cancel()


class ShadowRead:
    """One shadowed read: fed default's response by its exchange, then the candidate's
    request, as an upstream stream listener."""

    __slots__ = (
        "_connecting",
        "_endpoint",
        "_summary",
        "_timer",
        "candidate",
        "candidate_said",
        "candidate_target",
        "complete",
        "default",
        "default_said",
        "default_seconds",
        "done",
        "gate",
        "headers",
        "identity",
        "reads",
        "rule",
        "sent_at",
        "target",
        "timeout",
        "upstream",
        "verb",
    )

    def __init__(
        self,
        reads: ShadowReads,
        gate: ShadowGate,
        rule: str,
        verb: str,
        target: str,
        headers: Headers,
        identity: Headers,
        timeout: float,
    ) -> None:
        self.reads = reads
        self.gate = gate
        self.rule = rule
        self.verb = verb
        self.target = target
        self.headers = headers  # the client's (a reference: they do not change)
        self.identity = identity  # its front-proxy identity headers
        self.timeout = timeout
        self.default: SummaryBuilder | None = SummaryBuilder(verb == "list")
        self.complete = False
        self.default_seconds = 0.0
        self.default_said = ""
        self._summary: Summary | None = None  # default's, once complete
        self.candidate: SummaryBuilder | None = None
        self.candidate_said = ""
        self.candidate_target = ""
        self.upstream: ClientStream | None = None
        self.sent_at = 0.0
        self.done = False
        self._endpoint: UpstreamEndpoint | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._connecting: asyncio.Task[HTTP2ClientConnection] | None = None

    # -- default's side (called by the exchange) -------------------------------------------
    def default_response(self, status: int, headers: Headers) -> None:
        if self.default is not None:
            self.default.response(status, headers)

    def default_data(self, data: bytes) -> None:
        """A chunk of default's answer, read after the loop has flushed it to the client
        (call_soon runs in order: the client's write, queued first, goes first)."""
        if self.default is not None:
            asyncio.get_running_loop().call_soon(self._read_default, data)

    def _read_default(self, data: bytes) -> None:
        if self.default is not None:
            self.default.feed(data)

    def default_end(self) -> None:
        self.complete = True

    def exchange_finished(self, seconds: float) -> None:
        """Default's exchange is over (after the chunks it read, in order)."""
        asyncio.get_running_loop().call_soon(self._default_done, seconds)

    def _default_done(self, seconds: float) -> None:
        """If default's answer came whole, ask the candidate."""
        if self.done:
            return
        builder, self.default = self.default, None
        if builder is None or not self.complete:
            self._end(Verdict(SKIPPED, "default-failed"))
            return
        self.default_seconds = seconds
        summary = builder.finish()
        self.default_said = summary.describe()
        if summary.status == 429 or summary.status >= 500:
            self._end(Verdict(SKIPPED, "default-failed"))
            return
        target = candidate_target(self.target, self.verb, summary)
        if isinstance(target, Verdict):
            self._end(target)
            return
        self.candidate_target = target
        self._summary = summary
        self._send()

    # -- the candidate's side ----------------------------------------------------------------
    def _send(self) -> None:
        group = self.gate.spec.group
        endpoint = self.reads.upstreams.pick(group, set())
        if endpoint is None:
            self._end(Verdict(SKIPPED, "ejected"))
            return
        self._endpoint = endpoint
        endpoint.in_flight += 1
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(self.timeout, self._timed_out)
        self.sent_at = time.monotonic()
        conn = endpoint.ready_connection()
        if conn is not None:
            self._open(endpoint, conn)
            return
        task = loop.create_task(endpoint.connection())
        self._connecting = task
        task.add_done_callback(self._connected)

    def _connected(self, task: asyncio.Task[HTTP2ClientConnection]) -> None:
        self._connecting = None
        if self.done or task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            if not isinstance(exc, ConnectError):
                log.error("shadow read: connecting failed", exc_info=exc)
            self._end(Verdict(ERROR, "connect"))
            return
        assert self._endpoint is not None
        self._open(self._endpoint, task.result())

    def _open(self, endpoint: UpstreamEndpoint, conn: HTTP2ClientConnection) -> None:
        headers = upstream_request_headers(
            "GET",
            endpoint.spec.scheme,
            endpoint.authority,
            self.candidate_target,
            self.headers,
            self.identity,
        )
        self.candidate = SummaryBuilder(self.verb == "list")
        try:
            self.upstream = conn.open_stream(headers, True, self)
        except StreamRefused:  # the connection filled up or is going away: not an answer
            self._end(Verdict(SKIPPED, "refused"))

    def on_response(self, status: int, headers: Headers) -> None:
        if self.candidate is not None:
            self.candidate.response(status, headers)

    def on_data(self, data: bytes, flow_len: int) -> None:
        if self.candidate is not None:
            self.candidate.feed(data)
        if self.upstream is not None:
            self.upstream.ack(flow_len)  # read as it comes: the summary holds nothing

    def on_end(self) -> None:
        builder, self.candidate = self.candidate, None
        if builder is None or self.done:
            return
        summary = builder.finish()
        self.candidate_said = summary.describe()
        assert self._summary is not None
        self._end(judge(self.verb, self._summary, summary))

    def on_reset(self, kind: str, reason: str) -> None:
        if kind == RESET_BROKEN:
            self._end(Verdict(ERROR, "reset"))
        else:  # GOAWAY or REFUSED_STREAM: the candidate did not process it
            self._end(Verdict(SKIPPED, "refused"))

    def _timed_out(self) -> None:
        self._timer = None
        if self.upstream is not None and not self.done:
            self.upstream.cancel()
        self._end(Verdict(ERROR, "timeout"))

    def cancel(self) -> None:
        """The gateway stops: the read ends uncounted as compared."""
        if self.upstream is not None and not self.done:
            self.upstream.cancel()
        self._end(Verdict(SKIPPED, "shutdown"))

    def _end(self, verdict: Verdict) -> None:
        if self.done:
            return
        self.done = True
        self.default = self.candidate = None
        if self._timer is not None:
            self._timer.cancel()
        if self._connecting is not None:
            self._connecting.cancel()
        if self._endpoint is not None:
            self._endpoint.in_flight -= 1
        seconds = time.monotonic() - self.sent_at if self.sent_at else 0.0
        self.reads.finished(self, verdict, seconds)
