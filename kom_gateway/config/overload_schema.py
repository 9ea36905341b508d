"""The routing YAML's `overload` section (limits per group and per client, protected and
exempt requests, rate-limit rules), validated into an `OverloadPolicy`: the part of the
schema's builder (`schema.py`) that knows overload protection."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from kom_gateway.config.keys import OVERLOAD_GROUP_KEYS, PER_CLIENT_KEYS
from kom_gateway.config.model import Group
from kom_gateway.config.yamldoc import YamlPath, kind_of
from kom_gateway.overload.policy import (
    DEFAULT_EXEMPT,
    DEFAULT_PROTECTED,
    DEFAULT_RESERVED_PERCENT,
    ClientLimits,
    GroupLimits,
    OverloadPolicy,
    RateLimitRule,
    RequestMatch,
)
from kom_gateway.routing.claims import parse_claim
from kom_gateway.routing.cutover import Match
from kom_gateway.routing.glob import Glob

VERBS = frozenset(
    {"get", "list", "watch", "create", "update", "patch", "delete", "deletecollection", "proxy"}
)


class OverloadSections:
    """Mixed into the schema's builder (`schema._Builder`), whose primitives it uses:
    mapping, fields, number, match, string, string_list, error and its `errors`."""

    def overload(self, value: Any, groups: Mapping[str, Group]) -> OverloadPolicy:
        path: YamlPath = ("overload",)
        keys = (*OVERLOAD_GROUP_KEYS, "reservedPercent", "groups", "retryAfter", "perClient")
        o = self.mapping(value, path, (*keys, "protected", "exempt", "rateLimits")) or {}
        limits = self.fields(
            {k: o[k] for k in OVERLOAD_GROUP_KEYS if k in o}, path, OVERLOAD_GROUP_KEYS, GroupLimits
        )
        per_group: dict[str, GroupLimits] = {}
        g = self.mapping(o.get("groups"), (*path, "groups"), tuple(groups)) or {}
        for name, spec in g.items():
            if name in groups:
                given = self.mapping(spec, (*path, "groups", name), tuple(OVERLOAD_GROUP_KEYS))
                merged = {  # a group's own keys over the section's
                    **{key: getattr(limits, f.attr) for key, f in OVERLOAD_GROUP_KEYS.items()},
                    **(given or {}),
                }
                per_group[name] = self.fields(
                    merged, (*path, "groups", name), OVERLOAD_GROUP_KEYS, GroupLimits
                )
        reserved = self.number(
            o, path, "reservedPercent", DEFAULT_RESERVED_PERCENT, zero=True, maximum=100
        )
        r = self.mapping(o.get("retryAfter"), (*path, "retryAfter"), ("minSeconds", "maxSeconds"))
        r = r or {}
        low = int(self.number(r, (*path, "retryAfter"), "minSeconds", 1, whole=True))
        high = int(self.number(r, (*path, "retryAfter"), "maxSeconds", 32, whole=True))
        if high < low:
            self.error((*path, "retryAfter"), f"maxSeconds ({high}) is below minSeconds ({low})")
        per_client = self.fields(
            o.get("perClient"), (*path, "perClient"), PER_CLIENT_KEYS, ClientLimits
        )
        protected = self.request_matches(o, (*path, "protected"), groups, DEFAULT_PROTECTED)
        exempt = self.request_matches(o, (*path, "exempt"), groups, DEFAULT_EXEMPT)
        return OverloadPolicy(
            limits,
            per_group,
            reserved,
            protected,
            exempt,
            self.rate_limits(o.get("rateLimits"), (*path, "rateLimits"), groups),
            low,
            high,
            per_client,
        )

    def request_matches(
        self,
        section: dict[str, Any],
        path: YamlPath,
        groups: Mapping[str, Group],
        default: tuple[RequestMatch, ...],
    ) -> tuple[RequestMatch, ...]:
        """A list of request matches; absent keeps the default, [] means none."""
        value = section.get(path[-1])
        if value is None:
            return default
        if not isinstance(value, list):
            self.error(path, f"must be a list of request matches, got {kind_of(value)}")
            return default
        out = []
        for i, item in enumerate(value):
            match = self.request_match(item, (*path, i), groups)
            if match is not None:
                out.append(match)
        return tuple(out)

    def request_match(
        self, value: Any, path: YamlPath, groups: Mapping[str, Group]
    ) -> RequestMatch | None:
        keys = ("userAgent", "user", "userGroup", "verbs", "resources", "groups", "namespaces")
        m = self.mapping(value, path, keys)
        if m is None:
            return None
        errors = len(self.errors)
        clients = self.match({k: m[k] for k in keys[:3] if k in m}, path) or Match()
        verbs = []
        for item_path, verb in self.string_list(m.get("verbs", []), (*path, "verbs")):
            if verb not in VERBS:
                self.error(item_path, f"unknown verb {verb!r} (verbs: {', '.join(sorted(VERBS))})")
            verbs.append(verb)
        resources = []
        for item_path, text in self.string_list(m.get("resources", []), (*path, "resources")):
            try:
                resources.append(parse_claim(text))
            except ValueError as exc:
                self.error(item_path, str(exc))
        names = []
        for item_path, name in self.string_list(m.get("groups", []), (*path, "groups")):
            if name not in groups:
                self.error(item_path, f"no group named {name!r} (groups: {', '.join(groups)})")
            names.append(name)
        namespaces = []
        for item_path, text in self.string_list(m.get("namespaces", []), (*path, "namespaces")):
            try:
                namespaces.append(Glob(text))
            except ValueError as exc:
                self.error(item_path, f"bad glob {text!r}: {exc}")
        if len(self.errors) > errors:
            return None
        return RequestMatch(
            clients, frozenset(verbs), tuple(resources), frozenset(names), tuple(namespaces)
        )

    def rate_limits(
        self, value: Any, path: YamlPath, groups: Mapping[str, Group]
    ) -> tuple[RateLimitRule, ...]:
        if value is None:
            return ()
        if not isinstance(value, list):
            self.error(path, f"must be a list of rules, got {kind_of(value)}")
            return ()
        rules: list[RateLimitRule] = []
        names: set[str] = set()
        for i, item in enumerate(value):
            item_path: YamlPath = (*path, i)
            r = self.mapping(item, item_path, ("name", "match", "qps", "burst", "per"), ("name",))
            if r is None:
                continue
            name = self.string(r.get("name"), (*item_path, "name")) if "name" in r else None
            if name in names:
                self.error((*item_path, "name"), f"rule name {name!r} is used twice")
            qps = self.number(r, item_path, "qps", 0.0) if "qps" in r else None
            if qps is None:
                self.error(item_path, "missing required key 'qps'")
            burst = int(self.number(r, item_path, "burst", max(1, math.ceil(qps or 1)), True))
            per = r.get("per", "rule")
            if per not in ("rule", "client"):
                self.error((*item_path, "per"), f"must be 'rule' or 'client', got {per!r}")
            match = self.request_match(r.get("match"), (*item_path, "match"), groups)
            if name is None or not qps or match is None:
                continue
            names.add(name)
            rules.append(RateLimitRule(name, match, qps, burst, per == "client"))
        return tuple(rules)
