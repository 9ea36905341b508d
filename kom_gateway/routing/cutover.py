"""Per-client gradual cut-over: which clients a rule matches, and which bucket a client is in.

A client is identified by who it is (a verified certificate subject, a hash of its bearer
token) or, failing that, where it comes from (the remote IP, never the port), combined
with the product token of its User-Agent (`kubelet` of `kubelet/v1.30.2 (linux/amd64)
kubernetes/...`). The version is left out on purpose: a rolling kubelet upgrade must not
move nodes between groups.

The key hashes to a bucket in [0, 100). A rule sends a client to a group when
`bucket < percent`, so the same client always gets the same answer at a given percent,
and raising a percent only ever moves clients from default to the group.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from kom_gateway.routing.glob import Glob

_BUCKET_SCALE = 100.0 / 2**64
# a rule's `shadow` without percent or maxPerSecond (docs/configuration.md#shadow)
SHADOW_PERCENT = 1.0
SHADOW_MAX_PER_SECOND = 10.0


def user_agent_product(user_agent: str) -> str:
    """`kubelet/v1.30.2 (linux/amd64) kubernetes/abc` -> `kubelet`."""
    end = len(user_agent)
    for sep in ("/", " "):
        pos = user_agent.find(sep)
        if 0 <= pos < end:
            end = pos
    return user_agent[:end]


def format_percent(value: float) -> str:
    """25.0 -> "25%", 12.5 -> "12.5%": how percents are shown to operators."""
    return f"{value:g}%"


def bucket_of(key: str) -> float:
    """Stable position of a client key in [0, 100)."""
    digest = hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big") * _BUCKET_SCALE


class Client:
    """Who sent a request, as far as the gateway knows it."""

    __slots__ = (
        "_bucket",
        "_key",
        "groups",
        "identity",
        "policy_memo",
        "remote_addr",
        "rule_memo",
        "user",
        "user_agent",
    )

    def __init__(
        self,
        user_agent: str = "",
        identity: str = "",
        remote_addr: str = "",
        user: str = "",
        groups: tuple[str, ...] = (),
    ) -> None:
        self.user_agent = user_agent
        self.identity = identity  # e.g. "x509:CN=system:node:n1,O=system:nodes", "token:…"
        self.remote_addr = remote_addr  # IP only
        self.user = user  # verified user name, "" when the apiserver decides (tokens)
        self.groups = groups
        self._bucket: float | None = None
        self._key: str | None = None
        # (rules it was matched against, the rule): set by Router, valid while rules are
        self.rule_memo: tuple[object, CutoverRule | None] | None = None
        self.policy_memo: Any = None  # set by OverloadPolicy.for_client

    @property
    def key(self) -> str:
        """Who and which program: the unit of cut-over buckets and of fair share."""
        key = self._key
        if key is None:
            who = self.identity or (f"addr:{self.remote_addr}" if self.remote_addr else "anonymous")
            key = self._key = f"{who}|{user_agent_product(self.user_agent)}"
        return key

    @property
    def bucket(self) -> float:
        if self._bucket is None:
            self._bucket = bucket_of(self.key)
        return self._bucket


@dataclass(frozen=True, slots=True)
class Match:
    """All given globs must match; an empty match matches every client."""

    user_agent: Glob | None = None
    user: Glob | None = None
    user_group: Glob | None = None

    def matches(self, client: Client) -> bool:
        if self.user_agent is not None and not self.user_agent.matches(client.user_agent):
            return False
        if self.user is not None and not self.user.matches(client.user):
            return False
        if self.user_group is not None:
            glob = self.user_group
            for group in client.groups:  # noqa: SIM110 (no any(genexpr): runs per request)
                if glob.matches(group):
                    return True
            return False
        return True

    def describe(self) -> str:
        parts = [
            f"{label}={glob.pattern}"
            for label, glob in (
                ("userAgent", self.user_agent),
                ("user", self.user),
                ("userGroup", self.user_group),
            )
            if glob is not None
        ]
        return " ".join(parts) or "(every client)"

    def as_json(self) -> dict[str, str]:
        out = {}
        if self.user_agent is not None:
            out["userAgent"] = self.user_agent.pattern
        if self.user is not None:
            out["user"] = self.user.pattern
        if self.user_group is not None:
            out["userGroup"] = self.user_group.pattern
        return out


@dataclass(frozen=True, slots=True)
class ShadowSpec:
    """A rule's shadow reads: `percent` of the reads of its clients still on default
    (at most `max_per_second`) are also asked of `group`, and the answers compared."""

    group: str
    percent: float
    max_per_second: float

    def as_json(self) -> dict[str, object]:
        return {"group": self.group, "percent": self.percent, "maxPerSecond": self.max_per_second}

    def describe(self) -> str:
        return (
            f"{format_percent(self.percent)} of reads also asked of {self.group} "
            f"(at most {self.max_per_second:g}/s)"
        )


@dataclass(frozen=True, slots=True)
class CutoverRule:
    """`match` -> share of matching clients (percent per group) moved off default."""

    index: int
    match: Match
    percent: Mapping[str, float]
    line: int = 0
    shadow: ShadowSpec | None = None
    # The rule as operators wrote its match ("userAgent=kubelet/*"): unique within a
    # config, so it names the rule in metrics and to the rollout controller.
    label: str = field(init=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "label", self.match.describe())

    def percent_for(self, group: str) -> float:
        return self.percent.get(group, 0.0)
