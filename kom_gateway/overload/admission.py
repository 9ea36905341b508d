"""Admission: admit a request (a `Ticket` to give back when it ends) or shed it with
the Retry-After to send. Pure: counts and buckets in memory, time passed in.

Order of decision, cheapest and most important first:
1. exempt requests are always admitted. As kube-apiserver's APF keeps exempt outside
   every priority level, they take none of the seats other clients are admitted against
   (a stalled admin must not starve everyone): they are counted apart (`exempt`, shown
   as in-flight kind "exempt"). They are bounded like anyone without being shed: their
   responses count against the per-client buffered-bytes budget, and a short one
   fetches only with one of its client's `per_client.max_inflight` seats, none while
   the client is over budget; without one it waits its turn (`clientshare.py`);
2. protected requests (node heartbeats, leader election) of a client whose certificate
   the gateway verified (kubelets and control-plane components) are never shed: they
   take seats of their group, past its limit if need be, so other requests are held
   back by them, but no limit of the gateway turns them away. In a restart storm the
   replica's own backlog fills a group's seats, and a 429 on a heartbeat is a retry
   (client-go's) that saves nothing and brings a node nearer NotReady. So that
   protection is no way around the limits, an identity has at most
   `per_client.max_protected_inflight` in flight as protected; past that its requests
   are ordinary ones. Other clients' protected requests (a bearer token the gateway
   cannot verify: a client may mint any number) may use the reserve, and are shed last;
3. fair share, for requests that are neither exempt nor protected: one client (client
   key) may have `per_client.max_inflight` non-long-running requests in flight while
   their group is contended (`CONTENDED` of its seats taken); past that its requests
   wait for one of its own seats (at most as many as it has in flight, at most the
   group's `max_queue_wait`), as APF queues a flow's requests before it rejects them,
   then are shed. No new request while the gateway holds more than
   `per_client.max_buffered_bytes` of responses it has not read (`clientshare.py`);
4. rate-limit rules apply to requests that are neither exempt nor protected;
5. watches are held to the group's `max_watches`;
6. other non-long-running requests are held to the group's `max_inflight`, less a reserve
   kept for protected requests; past it they queue, then are shed. Other long-running
   requests (exec, logs -f, proxy) are not limited, as in kube-apiserver's max-in-flight
   filter.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from kom_gateway.kube.requestinfo import RequestInfo
from kom_gateway.overload.clientshare import ClientBuffers
from kom_gateway.overload.policy import (
    CONTENDED,
    QUEUE_PER_SEAT,
    OverloadPolicy,
    RateLimitRule,
    RequestMatch,
)
from kom_gateway.overload.ratelimit import BucketSet, whole_seconds
from kom_gateway.overload.retryafter import RetryAfter
from kom_gateway.routing.cutover import Client

SHORT = "short"
WATCH = "watch"
OTHER = "long-running"


class Ticket:
    """An admitted request's place; `release()` exactly once when it ends.

    A `pending` ticket holds no seat yet: it waits (`wait`) until a seat frees
    (`on_seat` is called) or its client gives up on it (`give_up`, after `max_wait`
    seconds: then it is shed). It found its group full and waits in the group's queue;
    or, `over_share`, its client past its share of a contended group, and waits in its
    client's queue for one of the client's own seats first (then for the group's)."""

    __slots__ = (
        "_admission",
        "_client_counts",
        "_counts",
        "client",
        "exempt",
        "group",
        "kind",
        "limit",
        "max_wait",
        "on_seat",
        "over_share",
        "pending",
        "protected",
        "released",
    )

    def __init__(
        self,
        counts: dict[str, int] | None,
        group: str,
        kind: str,
        client_counts: dict[str, int] | None = None,
        client: str = "",
        exempt: bool = False,
        admission: Admission | None = None,
        limit: int = 0,
        max_wait: float = 0.0,
        protected: bool = False,
        over_share: bool = False,
    ) -> None:
        self._counts = counts
        self.group = group
        self.kind = kind
        self.exempt = exempt  # never shed: a short one fetches with a seat of its client's
        self.protected = protected  # a protected request: its responses held to no budget
        self.released = False
        self._client_counts = client_counts
        self.client = client  # whose count it is in, and whose budget its responses use
        self._admission = admission  # whose queue frees seats to (group-limited requests)
        self.limit = limit  # the seats it may take (its group's limit, less any reserve)
        self.max_wait = max_wait
        self.over_share = over_share  # waits for a seat of its client's (no count yet)
        self.pending = over_share or (
            counts is not None and limit > 0 and counts.get(group, 0) >= limit
        )
        self.on_seat: Callable[[], None] | None = None
        if counts is not None and not self.pending:
            counts[group] = counts.get(group, 0) + 1
        if client_counts is not None and not over_share:
            client_counts[client] = client_counts.get(client, 0) + 1

    def wait(self, on_seat: Callable[[], None]) -> None:
        """Queue for a seat (a pending ticket): its client's, then its group's."""
        assert self._admission is not None
        self.on_seat = on_seat
        self._admission.enqueue(self)

    def give_up(self, now: float) -> Rejection:
        """Its wait is over without a seat: leave the queue, and be shed."""
        assert self._admission is not None
        return self._admission.give_up(self, now)

    def release(self) -> None:
        if self.released:
            return
        self.released = True
        if self._counts is not None and not self.pending:
            self._counts[self.group] -= 1
        if self._client_counts is not None and not self.over_share:
            left = self._client_counts[self.client] - 1
            if left:
                self._client_counts[self.client] = left
            else:
                del self._client_counts[self.client]
        admission = self._admission
        if admission is not None and admission.queued:
            admission.released(self)


@dataclass(frozen=True, slots=True)
class Rejection:
    reason: str  # "inflight", "watches", "rate-limit", "client-inflight", "client-buffer"
    detail: str  # the rule name for rate limits, else the group
    retry_after: int
    message: str


def _any_match(matches: tuple[RequestMatch, ...], info: RequestInfo, group: str) -> bool:
    for match in matches:  # noqa: SIM110 (a loop, not any(genexpr): runs per request)
        if match.matches_request(info, group):
            return True
    return False


class Admission:
    """Counts survive a policy change (requests in flight keep their tickets)."""

    def __init__(self, policy: OverloadPolicy | None = None) -> None:
        self.inflight: dict[str, int] = {}
        self.watches: dict[str, int] = {}
        self.long_running: dict[str, int] = {}
        self.exempt: dict[str, int] = {}  # group -> exempt requests in flight, any kind
        self.queues: dict[str, deque[Ticket]] = {}  # group -> pending short requests, FIFO
        # client key -> its short requests waiting past its share, FIFO
        self.client_queues: dict[str, deque[Ticket]] = {}
        self.queued = 0  # in all queues
        self.client_inflight: dict[str, int] = {}  # client key -> short requests (unprotected)
        self.protected_inflight: dict[str, int] = {}  # verified identity -> never-shed ones
        self.buffers = ClientBuffers()
        self._retry: dict[str, RetryAfter] = {}
        self._buckets: dict[RateLimitRule, BucketSet] = {}
        self.policy = OverloadPolicy()
        self.configure(policy or OverloadPolicy())

    def configure(self, policy: OverloadPolicy) -> None:
        """Apply a (reloaded) policy; a rule whose qps, burst and match are unchanged
        keeps its buckets."""
        old, self.policy = self.policy, policy
        self.buffers.max_buffered = policy.per_client.max_buffered_bytes
        self.buffers.max_seats = policy.per_client.max_inflight
        kept = self._buckets
        self._buckets = {}
        for rule in policy.rate_limits:
            buckets = kept.get(rule)
            self._buckets[rule] = (
                buckets if buckets is not None else BucketSet(rule.qps, rule.burst)
            )
        if (old.retry_after_min, old.retry_after_max) != (
            policy.retry_after_min,
            policy.retry_after_max,
        ):
            self._retry = {}

    def admit(
        self, info: RequestInfo, client: Client, group: str, now: float
    ) -> Ticket | Rejection:
        # Runs on every request: the memo and limit lookups are inlined, and empty match
        # lists are not walked.
        policy = self.policy
        kind = SHORT
        counts = self.inflight
        if info.is_long_running:
            if info.verb == "watch":
                kind, counts = WATCH, self.watches
            else:
                kind, counts = OTHER, self.long_running
        mine = client.policy_memo
        if mine is None or mine.policy is not policy:
            mine = policy.for_client(client)
        if mine.exempt and _any_match(mine.exempt, info, group):
            # never shed, in no group's seats; its buffered responses count (its key)
            return Ticket(self.exempt, group, kind, None, client.key, kind is SHORT)
        protected = _any_match(mine.protected, info, group)
        if protected and kind is SHORT and client.user:  # (a verified certificate)
            who = client.identity
            if self.protected_inflight.get(who, 0) < policy.per_client.max_protected_inflight:
                # never shed: a seat of its group, whether or not one is free
                return Ticket(counts, group, kind, self.protected_inflight, who, False, self,
                              protected=True)  # fmt: skip
            protected = False  # past its identity's allowance: an ordinary request
        client_counts = None
        over_share = False
        key = ""  # protected requests are held to no client's share
        if not protected:
            key = client.key
            buffers = self.buffers
            if buffers.over_budget(key):
                return Rejection(
                    "client-buffer",
                    group,
                    self._shed("client", now),
                    "Too many requests, please try again later (this client has not read "
                    f"{buffers.buffered[key]} bytes of responses; read them first)",
                )
            if kind is SHORT:
                most = policy.per_client.max_inflight
                if (
                    most
                    and self.client_inflight.get(key, 0) >= most
                    and self._contended(policy, group)
                ):
                    # past its share: wait for one of its own seats, as APF queues a
                    # flow's requests (its in-flight count again at most), else shed
                    own = self.client_queues.get(key)
                    if (
                        not policy.group_limits.get(group, policy.limits).max_queue_wait
                        or (own is not None and len(own) >= most)
                    ):
                        return self._client_rejection(group, most, now)
                    over_share = True
                client_counts = self.client_inflight
            for rule in mine.rate_limits:
                if not rule.match.matches_request(info, group):
                    continue
                wait = self._buckets[rule].take(key if rule.per_client else "", now)
                if wait:
                    retry = max(whole_seconds(wait), self._shed(f"rule:{rule.name}", now))
                    return Rejection(
                        "rate-limit",
                        rule.name,
                        retry,
                        f"Too many requests, please try again later "
                        f"(rate limit {rule.name!r}: {rule.qps:g} qps, burst {rule.burst})",
                    )
        if kind is SHORT:
            limits = policy.group_limits.get(group, policy.limits)
            limit = limits.max_inflight
            if limit:
                if not protected:
                    limit -= int(limit * policy.reserved_percent / 100)
                if counts.get(group, 0) >= limit:
                    queue = self.queues.get(group)
                    waiting = len(queue) if queue is not None else 0
                    if not limits.max_queue_wait or waiting >= QUEUE_PER_SEAT * limit:
                        return self._inflight_rejection(group, limit, now)
            # pending when its group is full or its client past its share: the caller
            # queues it. Limited or not, its release frees its client's seat to a waiter.
            return Ticket(counts, group, kind, client_counts, key, False, self, limit,
                          limits.max_queue_wait, protected, over_share)  # fmt: skip
        elif kind is WATCH:
            most = policy.group_limits.get(group, policy.limits).max_watches
            if most and counts.get(group, 0) >= most:
                return Rejection(
                    "watches",
                    group,
                    self._shed(f"watch:{group}", now),
                    f"Too many requests, please try again later "
                    f"(group {group!r} holds its limit of {most} watches)",
                )
        if protected:
            return Ticket(counts, group, kind, protected=True)
        return Ticket(counts, group, kind, client_counts, key)

    def _contended(self, policy: OverloadPolicy, group: str) -> bool:
        """Whether `group` has seats worth sharing out: at least CONTENDED of its
        `max_inflight` taken (no limit: always). Below that a client past its share may
        use seats nobody else wants, as APF seats any flow while its priority level has
        room: a controller whose requests pile up because a restart storm slows every
        answer gets no 429 from a group that is nowhere near full."""
        limit = policy.group_limits.get(group, policy.limits).max_inflight
        return not limit or self.inflight.get(group, 0) >= limit * CONTENDED

    def _client_rejection(self, group: str, most: int, now: float) -> Rejection:
        return Rejection(
            "client-inflight",
            group,
            self._shed("client", now),
            f"Too many requests, please try again later (this client has {most} "
            "requests in flight through this gateway replica)",
        )

    def _inflight_rejection(self, group: str, limit: int, now: float) -> Rejection:
        return Rejection(
            "inflight",
            group,
            self._shed(f"inflight:{group}", now),
            f"Too many requests, please try again later "
            f"(group {group!r} has {limit} requests in flight)",
        )

    # -- the queues (FIFO): APF queues before it rejects ----------------------------------
    def enqueue(self, ticket: Ticket) -> None:
        if ticket.over_share:  # its client's queue first
            queue = self.client_queues.get(ticket.client)
            if queue is None:
                queue = self.client_queues[ticket.client] = deque()
        else:
            queue = self._group_queue(ticket.group)
        queue.append(ticket)
        self.queued += 1
        self._seat(ticket.group)  # a seat may have freed meanwhile

    def _group_queue(self, group: str) -> deque[Ticket]:
        queue = self.queues.get(group)
        if queue is None:
            queue = self.queues[group] = deque()
        return queue

    def give_up(self, ticket: Ticket, now: float) -> Rejection:
        self._leave(ticket)
        if ticket.over_share:
            return self._client_rejection(ticket.group, self.policy.per_client.max_inflight, now)
        return self._inflight_rejection(ticket.group, ticket.limit, now)

    def released(self, ticket: Ticket) -> None:
        """A ticket ended: a pending one leaves its queue; a seat it held goes to the
        first in line: its group's to the group's queue, its client's to the client's."""
        if ticket.pending:
            self._leave(ticket)
        else:
            self._seat(ticket.group)
        if not ticket.over_share and ticket._client_counts is not None:
            self._share(ticket.client)

    def _leave(self, ticket: Ticket) -> None:
        if ticket.over_share:
            queue = self.client_queues.get(ticket.client)
        else:
            queue = self.queues.get(ticket.group)
        if queue is None:
            return
        try:
            queue.remove(ticket)
        except ValueError:  # seated, or already gone (its wait ended)
            return
        self.queued -= 1
        if not queue and ticket.over_share:
            del self.client_queues[ticket.client]

    def _share(self, client: str) -> None:
        """One of `client`'s seats freed: its first request waiting past its share takes
        it, and then waits for its group's seat like any (at once when one is free)."""
        queue = self.client_queues.get(client)
        most = self.policy.per_client.max_inflight
        counts = self.client_inflight
        while queue and (not most or counts.get(client, 0) < most):
            ticket = queue.popleft()
            if not queue:
                del self.client_queues[client]
            ticket.over_share = False
            counts[client] = counts.get(client, 0) + 1
            if ticket.limit:
                self._group_queue(ticket.group).append(ticket)  # (still counted queued)
                self._seat(ticket.group)
            else:  # a group with no limit
                self.queued -= 1
                self._give_seat(ticket)

    def queued_by_group(self) -> dict[str, int]:
        """Requests waiting, by group: for a seat of the group, or of their client."""
        waiting = {group: len(queue) for group, queue in self.queues.items()}
        for queue in self.client_queues.values():
            for ticket in queue:
                waiting[ticket.group] = waiting.get(ticket.group, 0) + 1
        return waiting

    def _seat(self, group: str) -> None:
        queue = self.queues.get(group)
        counts = self.inflight
        while queue and counts.get(group, 0) < queue[0].limit:
            self.queued -= 1
            self._give_seat(queue.popleft())

    def _give_seat(self, ticket: Ticket) -> None:
        ticket.pending = False
        self.inflight[ticket.group] = self.inflight.get(ticket.group, 0) + 1
        if ticket.on_seat is not None:
            ticket.on_seat()

    def _shed(self, key: str, now: float) -> int:
        tracker = self._retry.get(key)
        if tracker is None:
            policy = self.policy
            tracker = self._retry[key] = RetryAfter(policy.retry_after_min, policy.retry_after_max)
        return tracker.shed(now)

    def load(self) -> float:
        """The fullest group's share of its in-flight limit (0 when none is limited):
        the in-flight part of this replica's load. Limits are per replica, so a client
        moved to another replica by GOAWAY finds room there."""
        worst = 0.0
        limits_for = self.policy.limits_for
        for group, count in self.inflight.items():
            limit = limits_for(group).max_inflight
            if limit and count / limit > worst:
                worst = count / limit
        return worst
