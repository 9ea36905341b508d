"""What changed between two configurations, in plain words, for the reload log.

An operator who edits a cut-over percent wants to read "cutover userAgent=kubelet/*:
pod 25% -> 50%" in the log, not a generation number. Pure: two Configs in, lines out.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from kom_gateway.config.keys import (
    ACCESS_LOG_KEYS,
    GOAWAY_KEYS,
    HEALTH_KEYS,
    HTTP2_DOWNSTREAM_KEYS,
    HTTP2_UPSTREAM_KEYS,
    LIMIT_KEYS,
    OVERLOAD_GROUP_KEYS,
    PER_CLIENT_KEYS,
    TIMEOUT_KEYS,
    Field,
)
from kom_gateway.config.model import Config
from kom_gateway.overload.policy import GroupLimits, RateLimitRule
from kom_gateway.routing.cutover import ShadowSpec, format_percent


def describe_changes(
    old: Config, new: Config, overridden: Mapping[str, str] | None = None
) -> list[str]:
    """What changed, in words, keyed as the YAML is. `overridden`: settings a command-line
    flag replaces (`{"listen.address": "--listen"}`), whose change therefore applies
    neither now nor on restart."""
    overridden = overridden or {}
    lines: list[str] = []
    lines += _groups(old, new)
    lines += _cutover(old, new)
    lines += _overload(old, new)
    lines += _fields("goaway", old.goaway, new.goaway, GOAWAY_KEYS)
    lines += _fields("limits", old.limits, new.limits, LIMIT_KEYS)
    lines += _fields("http2.downstream", old.http2_downstream, new.http2_downstream,
                     HTTP2_DOWNSTREAM_KEYS)  # fmt: skip
    lines += _fields("http2.upstream", old.http2_upstream, new.http2_upstream, HTTP2_UPSTREAM_KEYS)
    lines += _fields("timeouts", old.timeouts, new.timeouts, TIMEOUT_KEYS)
    lines += _fields("health", old.health, new.health, HEALTH_KEYS)
    lines += _named_fields("upstream.tls", old.upstream_tls, new.upstream_tls, UPSTREAM_TLS_KEYS)
    lines += (
        f"{line} (not applied: {overridden['accessLog']} overrides it)"
        if "accessLog" in overridden
        else line
        for line in _named_fields("accessLog", old.access_log, new.access_log, ACCESS_LOG_KEYS)
    )
    if old.answered_by_header != new.answered_by_header:
        lines.append(
            f"debug.answeredByHeader: {old.answered_by_header or 'off'} -> "
            f"{new.answered_by_header or 'off'}"
        )
    for name, before, after in (
        ("listen.address", old.listen, new.listen),
        ("listen.tls", old.listen_tls, new.listen_tls),
        ("admin.address", old.admin, new.admin),
        ("http2.engine", old.http2_engine, new.http2_engine),
    ):
        if before != after:
            when = (
                f"not applied: {overridden[name]} overrides it"
                if name in overridden
                else "takes effect on restart"
            )
            lines.append(f"{name}: {_show(before)} -> {_show(after)} ({when})")
    # whatever changed without a line above (a new setting, a change no describer
    # words) is still named: the reload log never says "no changes" when there were
    for attr, yaml in YAML_SECTIONS.items():
        prefixes = _LINE_PREFIXES.get(attr, (f"{yaml}:", f"{yaml}."))
        if getattr(old, attr) != getattr(new, attr) and not any(
            line.startswith(prefixes) for line in lines
        ):
            lines.append(f"{yaml}: changed")
    return lines or ["no changes"]


# Config's fields -> the YAML they come from (every field but `warnings` and `source`;
# tests/test_config.py checks the table is complete)
YAML_SECTIONS: dict[str, str] = {
    "groups": "groups",
    "cutover": "cutover",
    "listen": "listen.address",
    "listen_tls": "listen.tls",
    "admin": "admin.address",
    "upstream_tls": "upstream.tls",
    "timeouts": "timeouts",
    "health": "health",
    "limits": "limits",
    "http2_downstream": "http2.downstream",
    "http2_upstream": "http2.upstream",
    "http2_engine": "http2.engine",
    "overload": "overload",
    "goaway": "goaway",
    "access_log": "accessLog",
    "answered_by_header": "debug.answeredByHeader",
}
_LINE_PREFIXES = {  # how the lines of sections worded in their own way begin
    "groups": ("group ",),
    "cutover": ("cutover ",),
    "overload": ("overload.", "rate limit "),
}


def _groups(old: Config, new: Config) -> Iterable[str]:
    for name, g in new.groups.items():
        if name not in old.groups:
            claims = ", ".join(str(c) for c in g.resources) or "nothing"
            yield f"group {name} added: {len(g.endpoints)} endpoints, claims {claims}"
    for name in old.groups:
        if name not in new.groups:
            yield f"group {name} removed (its resources go to default)"
    for name, after in new.groups.items():
        if name not in old.groups:
            continue
        before = old.groups[name]
        added = [str(e) for e in after.endpoints if e not in before.endpoints]
        gone = [str(e) for e in before.endpoints if e not in after.endpoints]
        if added or gone:
            yield f"group {name} endpoints: " + ", ".join(
                [f"+{e}" for e in added] + [f"-{e}" for e in gone]
            )
        claimed = [str(c) for c in after.resources if c not in before.resources]
        released = [str(c) for c in before.resources if c not in after.resources]
        if claimed:
            yield f"group {name} now claims {', '.join(claimed)}"
        if released:
            yield f"group {name} no longer claims {', '.join(released)}"


def _percents(percent: dict[str, float] | Any) -> str:
    return ", ".join(f"{g} {format_percent(p)}" for g, p in percent.items()) or "pinned to default"


def _shadow(shadow: ShadowSpec | None) -> str:
    return "off" if shadow is None else shadow.describe()


def _cutover(old: Config, new: Config) -> Iterable[str]:
    before = {r.label: r for r in old.cutover}
    after = {r.label: r for r in new.cutover}
    for key, rule in after.items():
        if key not in before:
            yield f"cutover {key} added: {_percents(rule.percent)}"
            continue
        was = before[key]
        changes = [
            f"{g} {format_percent(was.percent_for(g))} -> {format_percent(rule.percent_for(g))}"
            for g in sorted(set(was.percent) | set(rule.percent))
            if was.percent_for(g) != rule.percent_for(g)
        ]
        if changes:
            yield f"cutover {key}: {', '.join(changes)}"
        if was.index != rule.index:
            yield f"cutover {key}: now rule [{rule.index}] (was [{was.index}])"
        if was.shadow != rule.shadow:
            yield f"cutover {key}: shadow {_shadow(was.shadow)} -> {_shadow(rule.shadow)}"
    for key, rule in before.items():
        if key not in after:
            yield (
                f"cutover {key} removed (was {_percents(rule.percent)}): "
                "its clients go back to default"
            )


def _overload(old: Config, new: Config) -> Iterable[str]:
    o, n = old.overload, new.overload
    for name in sorted(set(old.groups) | set(new.groups)):
        before, after = o.limits_for(name), n.limits_for(name)
        if name in old.groups and name in new.groups and before != after:
            for change in _limit_changes(before, after):
                yield f"overload.groups.{name}.{change}"
    if o.reserved_percent != n.reserved_percent:
        yield (
            f"overload.reservedPercent: {format_percent(o.reserved_percent)} -> "
            f"{format_percent(n.reserved_percent)}"
        )
    for label, before_m, after_m in (
        ("protected", o.protected, n.protected),
        ("exempt", o.exempt, n.exempt),
    ):
        if before_m != after_m:
            yield (f"overload.{label}: {'; '.join(m.describe() for m in after_m) or 'none'}"
                   f" (was {'; '.join(m.describe() for m in before_m) or 'none'})")  # fmt: skip
    if (o.retry_after_min, o.retry_after_max) != (n.retry_after_min, n.retry_after_max):
        yield (f"overload.retryAfter: {o.retry_after_min}-{o.retry_after_max} s -> "
               f"{n.retry_after_min}-{n.retry_after_max} s")  # fmt: skip
    yield from _fields("overload.perClient", o.per_client, n.per_client, PER_CLIENT_KEYS)
    rules_before = {r.name: r for r in o.rate_limits}
    rules_after = {r.name: r for r in n.rate_limits}
    for name, rule in rules_after.items():
        if name not in rules_before:
            yield f"rate limit {name!r} added: {_rule(rule)}"
        elif rules_before[name] != rule:
            yield f"rate limit {name!r}: {_rule(rules_before[name])} -> {_rule(rule)}"
    for name in rules_before:
        if name not in rules_after:
            yield f"rate limit {name!r} removed"


def _limit_changes(before: GroupLimits, after: GroupLimits) -> list[str]:
    out = []
    for label, f in OVERLOAD_GROUP_KEYS.items():
        b, a = getattr(before, f.attr), getattr(after, f.attr)
        if a != b:
            out.append(f"{label}: {_number(b) if b else 'off'} -> {_number(a) if a else 'off'}")
    return out


def _rule(rule: RateLimitRule) -> str:
    per = "per client" if rule.per_client else "shared"
    return f"{rule.match.describe()} at {rule.qps:g} qps, burst {rule.burst}, {per}"


def _fields(section: str, before: Any, after: Any, table: dict[str, Field]) -> Iterable[str]:
    """Changes of a numeric section, named by their YAML keys."""
    for key, f in table.items():
        b, a = getattr(before, f.attr), getattr(after, f.attr)
        if a != b:
            yield f"{section}.{key}: {_number(b)} -> {_number(a)}"


UPSTREAM_TLS_KEYS = {
    "caFile": "ca_file",
    "certFile": "cert_file",
    "keyFile": "key_file",
    "serverName": "server_name",
}


def _named_fields(section: str, before: Any, after: Any, names: dict[str, str]) -> Iterable[str]:
    """Changes of a section of strings, named by their YAML keys."""
    for key, attr in names.items():
        b, a = getattr(before, attr), getattr(after, attr)
        if a != b:
            yield f"{section}.{key}: {_show(b)} -> {_show(a)}"


def _number(value: float) -> str:
    return str(value) if isinstance(value, int) else f"{value:g}"


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return "none" if value is None else str(value)
