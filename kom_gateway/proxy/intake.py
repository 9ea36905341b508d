"""The one way in: every request, whichever HTTP version or engine carried it and
whether or not it asks to switch protocols, goes through `Intake.handle`:

    parse -> reject a malformed target (400) -> identify the client -> route
    -> count the cut-over decision -> admit (or 429) -> hand to its carrier

The carrier is an `Exchange` for a request, `carry_upgrade` for exec, attach and
port-forward. A read that a rule's `shadow` samples gets a `ShadowRead` on its exchange
(shadow/reads.py: its answer is also asked of the candidate group). The config snapshot
is read once, so a reload never changes a request's decision half-way.
"""

from __future__ import annotations

import asyncio
import random
import time
from typing import Any

from kom_gateway.config.holder import Active, ConfigHolder
from kom_gateway.http.stream import Headers, ServerStream
from kom_gateway.kube.identity import PeerIdentity, token_identity
from kom_gateway.kube.requestinfo import ParseCache
from kom_gateway.overload.admission import Admission, Rejection
from kom_gateway.proxy.context import ProxyContext
from kom_gateway.proxy.exchange import Exchange, answer_status
from kom_gateway.proxy.headers import answered_by
from kom_gateway.proxy.outcome import ANSWERED_BY_GATEWAY, Outcome
from kom_gateway.proxy.upgrade import carry_upgrade
from kom_gateway.routing.cutover import Client
from kom_gateway.routing.router import DEFAULT_GROUP, REASON_NOT_CUT_OVER, Decision

CLIENT_CACHE_SIZE = 16384


class Intake:
    def __init__(self, holder: ConfigHolder, admission: Admission, ctx: ProxyContext) -> None:
        self.holder = holder
        self.admission = admission
        self.ctx = ctx
        self.goaway_chance = 0.0  # per HTTP/2 request, set from the load a few times a second
        self._clients: dict[tuple[bytes, str, bytes], Client] = {}
        self.parsed = ParseCache()
        self._cutover_children: tuple[int, dict[tuple, Any]] = (0, {})

    def handle(self, stream: ServerStream) -> None:
        active = self.holder.current
        ctx = self.ctx
        info = self.parsed.parse(stream.method, stream.target)
        client = self.client_for(stream.headers, stream.remote_addr, stream.peer)
        if info.malformed and info.bad_target:
            message = f"malformed request target: {info.malformed}"
            extra = answered_by(active.config.answered_by_header, ANSWERED_BY_GATEWAY, None)
            answer_status(stream, 400, "BadRequest", message, None, extra)
            ctx.recorder.record(Outcome(client, info, None, ANSWERED_BY_GATEWAY, 400), "none")
            return
        decision = active.router.decide(info, client)
        if decision.home != DEFAULT_GROUP:
            self._count_cutover(active, decision)
        verdict = self.admission.admit(info, client, decision.target, time.monotonic())
        if isinstance(verdict, Rejection):
            extra = answered_by(active.config.answered_by_header, ANSWERED_BY_GATEWAY, None)
            answer_status(
                stream, 429, "TooManyRequests", verdict.message, verdict.retry_after, extra
            )
            m = ctx.metrics
            m.child(m.shed, decision.target, verdict.reason).inc()
            outcome = Outcome(client, info, decision, ANSWERED_BY_GATEWAY, 429)
            ctx.recorder.record(outcome, decision.target)
        elif stream.upgrade:
            task = asyncio.get_running_loop().create_task(
                carry_upgrade(ctx, stream, info, client, decision, active, verdict)
            )
            ctx.upgrades.add(task)
            task.add_done_callback(ctx.upgrades.discard)
        else:
            exchange = Exchange(ctx, stream, info, client, decision, active, verdict)
            rule = decision.rule
            if (
                rule is not None
                and rule.shadow is not None
                and decision.reason == REASON_NOT_CUT_OVER
                and rule.shadow.group == decision.home
            ):
                peer = stream.peer
                exchange.shadow = ctx.shadows.sample(
                    rule,
                    info,
                    stream.method,
                    stream.target,
                    stream.headers,
                    peer.headers if peer is not None else [],
                    active.config.timeouts.request,
                )
            exchange.start()
        chance = self.goaway_chance
        if chance and stream.http_version == "2" and random.random() < chance:
            stream.goaway_connection("load")

    def client_for(self, headers: Headers, remote_addr: str, peer: PeerIdentity | None) -> Client:
        """Who is asking, for the cut-over bucket; cached (its bucket and rule memoised)."""
        user_agent = b""
        authorization = b""
        for name, value in headers:
            if name == b"user-agent":
                user_agent = value
            elif name == b"authorization":
                authorization = value
        key = (authorization, peer.key if peer else remote_addr, user_agent)
        client = self._clients.get(key)
        if client is None:
            client = _new_client(remote_addr, peer, user_agent, authorization)
            if len(self._clients) >= CLIENT_CACHE_SIZE:
                self._clients.clear()
            self._clients[key] = client
        return client

    def _count_cutover(self, active: Active, decision: Decision) -> None:
        """Count a decision on its cut-over counter, labelled with its rule's match as
        operators wrote it (children cached per configuration generation)."""
        rule = decision.rule
        label = rule.label if rule is not None else "none"
        key = (label, decision.home, decision.target)
        generation, children = self._cutover_children
        if generation != active.generation:
            children = {}
            self._cutover_children = (active.generation, children)
        child = children.get(key)
        if child is None:
            m = self.ctx.metrics
            child = children[key] = m.child(m.cutover, label, decision.home, decision.target)
        self.ctx.metrics.count(child)


def _new_client(
    remote_addr: str, peer: PeerIdentity | None, user_agent: bytes, authorization: bytes
) -> Client:
    """The cut-over key: the verified certificate's identity (what the apiserver will
    authenticate), else a digest of the bearer token, else the address."""
    ua = user_agent.decode("latin-1")
    if peer is not None:
        return Client(ua, peer.key, remote_addr, peer.user, peer.groups)
    if authorization[:7].lower() == b"bearer ":
        return Client(ua, token_identity(authorization[7:]), remote_addr)
    return Client(ua, "", remote_addr)
