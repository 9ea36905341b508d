"""What the overload YAML becomes: limits per group, who is protected or exempt, rate
limits. Plain data, built by the config schema and read by `Admission`."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

from kom_gateway.kube.requestinfo import RequestInfo
from kom_gateway.routing.claims import ResourceClaim
from kom_gateway.routing.cutover import Client, Match
from kom_gateway.routing.glob import Glob


@dataclass(frozen=True, slots=True)
class RequestMatch:
    """All given conditions must hold; an empty match matches every request.

    `resources` use the claim syntax of the groups section; `groups` are the gateway's
    groups (the request's target); user and userGroup are known only for clients with a
    verified certificate (the gateway does not see who a bearer token belongs to).
    """

    clients: Match = field(default_factory=Match)
    verbs: frozenset[str] = frozenset()
    resources: tuple[ResourceClaim, ...] = ()
    groups: frozenset[str] = frozenset()
    namespaces: tuple[Glob, ...] = ()

    def matches(self, info: RequestInfo, client: Client, group: str) -> bool:
        return self.matches_request(info, group) and self.clients.matches(client)

    def matches_request(self, info: RequestInfo, group: str) -> bool:
        """The conditions on the request alone (the client's are memoised per client)."""
        if self.verbs and info.verb not in self.verbs:
            return False
        if self.groups and group not in self.groups:
            return False
        if self.resources:
            for claim in self.resources:
                if _covers(claim, info):
                    break
            else:
                return False
        if not self.namespaces:
            return True
        for glob in self.namespaces:  # noqa: SIM110 (a loop, not any(genexpr): per request)
            if glob.matches(info.namespace):
                return True
        return False

    def describe(self) -> str:
        parts = [self.clients.describe()] if self.clients != Match() else []
        for label, values in (
            ("verbs", sorted(self.verbs)),
            ("resources", [str(c) for c in self.resources]),
            ("groups", sorted(self.groups)),
            ("namespaces", [g.pattern for g in self.namespaces]),
        ):
            if values:
                parts.append(f"{label}={','.join(values)}")
        return " ".join(parts) or "(every request)"


def _covers(claim: ResourceClaim, info: RequestInfo) -> bool:
    if not info.is_resource_request or claim.api_group != info.api_group:
        return False
    if claim.resource == "*":
        return True
    return claim.resource == info.resource and (
        not claim.subresource or claim.subresource == info.subresource
    )


QUEUE_PER_SEAT = 4  # requests that may wait for a group's seats: 4 per seat
# share of a group's max_inflight taken from which one client is held to its
# perClient.maxInflight (below it, seats nobody else wants are anyone's)
CONTENDED = 0.5


@dataclass(frozen=True, slots=True)
class GroupLimits:
    max_inflight: int = 1000  # non-long-running requests in flight (0: no limit)
    max_watches: int = 0  # open watches (0: no limit)
    # a request finding the group full waits this long for a seat before its 429: APF's
    # own wait (a quarter of kube-apiserver's 60 s request timeout). A restart storm
    # fills the seats with the replica's own backlog for as long as it lasts (~10 s)
    max_queue_wait: float = 15.0


@dataclass(frozen=True, slots=True)
class ClientLimits:
    """What one client (client key: identity + program) may hold of a replica. Sized so
    a kubelet or an operator never meets them; exempt clients (system:masters) and
    protected requests (lease renewals) are never held to them."""

    # non-long-running requests in flight while their group is contended (0: no limit)
    max_inflight: int = 100
    max_buffered_bytes: int = 32 * 1024 * 1024  # response bytes held for it (0: no budget)
    # protected requests one verified identity (its certificate, whatever its User-Agent)
    # may have in flight never shed. A kubelet has two at most (its lease, its node
    # status), a leader-elected controller one per lock; more are ordinary (0: all are)
    max_protected_inflight: int = 4


@dataclass(frozen=True, slots=True)
class RateLimitRule:
    name: str
    match: RequestMatch
    qps: float
    burst: int
    per_client: bool = False  # one bucket per client key, else one for the whole rule


LEASES = ResourceClaim("coordination.k8s.io", "leases")
NODE_STATUS = ResourceClaim("", "nodes", "status")
# Node heartbeats (Kubernetes' two kinds: the node's Lease and its .status) and leader
# election renewals: never shed from a verified certificate, up to
# `per_client.max_protected_inflight` an identity; from other clients shed last (they may
# use the reserve). Not LIST/WATCH of leases: a storm of those must not eat the reserve.
DEFAULT_PROTECTED = (
    RequestMatch(verbs=frozenset({"get", "create", "update", "patch"}), resources=(LEASES,)),
    RequestMatch(verbs=frozenset({"update", "patch"}), resources=(NODE_STATUS,)),
)
# Break-glass access: cluster admins are never shed by the gateway.
DEFAULT_EXEMPT = (RequestMatch(clients=Match(user_group=Glob("system:masters"))),)


DEFAULT_RESERVED_PERCENT = 10.0


@dataclass(frozen=True)
class OverloadPolicy:
    limits: GroupLimits = field(default_factory=GroupLimits)  # every group not listed
    group_limits: Mapping[str, GroupLimits] = field(default_factory=dict)
    reserved_percent: float = DEFAULT_RESERVED_PERCENT  # of max_inflight, for protected only
    protected: tuple[RequestMatch, ...] = DEFAULT_PROTECTED
    exempt: tuple[RequestMatch, ...] = DEFAULT_EXEMPT
    rate_limits: tuple[RateLimitRule, ...] = ()
    retry_after_min: int = 1
    retry_after_max: int = 32  # APF's cap
    per_client: ClientLimits = field(default_factory=ClientLimits)

    def limits_for(self, group: str) -> GroupLimits:
        return self.group_limits.get(group, self.limits)

    def for_client(self, client: Client) -> ClientPolicy:
        """The exempt, protected and rate-limit matches whose client conditions `client`
        meets; memoised on the client (its identity does not change), per policy."""
        memo = client.policy_memo
        if memo is not None and memo.policy is self:
            return memo
        memo = client.policy_memo = ClientPolicy(
            self,
            tuple(m for m in self.exempt if m.clients.matches(client)),
            tuple(m for m in self.protected if m.clients.matches(client)),
            tuple(r for r in self.rate_limits if r.match.clients.matches(client)),
        )
        return memo


class ClientPolicy(NamedTuple):
    policy: OverloadPolicy
    exempt: tuple[RequestMatch, ...]
    protected: tuple[RequestMatch, ...]
    rate_limits: tuple[RateLimitRule, ...]
