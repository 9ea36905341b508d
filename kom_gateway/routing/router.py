"""The routing decision: RequestInfo + Client -> which apiserver group serves it, and why.

Pure and synchronous; the data plane calls `Router.decide` once per request and then
applies health-based fallback on top (an unhealthy target goes to default).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import NamedTuple

from kom_gateway.kube.requestinfo import RequestInfo
from kom_gateway.routing.claims import ClaimTable, ResourceClaim
from kom_gateway.routing.cutover import Client, CutoverRule

DEFAULT_GROUP = "default"

# Why a request went where it went (stable strings: they appear in logs and metrics).
REASON_HOME_IS_DEFAULT = "home-is-default"
REASON_NO_RULE = "no-cutover-rule"
REASON_CUT_OVER = "cut-over"
REASON_NOT_CUT_OVER = "not-cut-over"


class Decision(NamedTuple):
    home: str  # the group claiming the request's resource
    target: str  # the group chosen: home, or default
    reason: str
    rule: CutoverRule | None = None  # the matching cut-over rule
    percent: float | None = None  # that rule's percent for the home group


_new_decision = tuple.__new__  # skips NamedTuple's Python-level __new__ on the hot path
_HOME_IS_DEFAULT = Decision(DEFAULT_GROUP, DEFAULT_GROUP, REASON_HOME_IS_DEFAULT)


class Router:
    """Claim table + ordered cut-over rules, built once per configuration."""

    __slots__ = ("_claims", "_rules")

    def __init__(
        self, claims: Iterable[tuple[ResourceClaim, str]], rules: Sequence[CutoverRule]
    ) -> None:
        self._claims = ClaimTable(claims)
        self._rules = tuple(rules)

    def matching_rule(self, client: Client) -> CutoverRule | None:
        """First rule matching the client; memoised on the client for this rule set."""
        memo = client.rule_memo
        if memo is not None and memo[0] is self._rules:
            return memo[1]
        found = None
        for rule in self._rules:
            if rule.match.matches(client):
                found = rule
                break
        client.rule_memo = (self._rules, found)
        return found

    def decide(self, info: RequestInfo, client: Client) -> Decision:
        if not info.is_resource_request:
            return _HOME_IS_DEFAULT
        home = self._claims.lookup(info.api_group, info.resource, info.subresource)
        if home is None or home == DEFAULT_GROUP:
            return _HOME_IS_DEFAULT
        memo = client.rule_memo  # matching_rule(), inlined: this runs on every request
        rule = (
            memo[1] if memo is not None and memo[0] is self._rules else self.matching_rule(client)
        )
        if rule is None:
            return _new_decision(Decision, (home, DEFAULT_GROUP, REASON_NO_RULE, None, None))
        percent = rule.percent.get(home, 0.0)
        # 0 and 100 need no hash: the common steady states stay cheap.
        if percent >= 100.0 or (percent > 0.0 and client.bucket < percent):
            return _new_decision(Decision, (home, home, REASON_CUT_OVER, rule, percent))
        return _new_decision(Decision, (home, DEFAULT_GROUP, REASON_NOT_CUT_OVER, rule, percent))
