"""Label and field selectors, as the apiserver applies them to objects."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from kom_gateway.kube.requestinfo import parse_field_selector

Predicate = Callable[[dict[str, Any]], bool]

_SET_TERM = re.compile(
    r"\s*(!?)\s*([A-Za-z0-9_./-]+)\s*(?:(notin|in)\s*\(([^)]*)\)|(==|!=|=)\s*([^,]*?))?\s*$"
)


class SelectorError(ValueError):
    pass


def _split_outside_parens(text: str) -> list[str]:
    parts, depth, start = [], 0, 0
    for i, c in enumerate(text):
        if c == "(":
            depth += 1
        elif c == ")":
            depth -= 1
        elif c == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return parts


def label_predicate(selector: str) -> Predicate:
    """Equality-based (`a=b`, `a!=b`) and set-based (`a in (x,y)`, `a notin (x)`, `a`, `!a`)."""
    if not selector.strip():
        return lambda obj: True
    checks: list[Callable[[dict[str, str]], bool]] = []
    for term in _split_outside_parens(selector):
        m = _SET_TERM.match(term)
        if not m:
            raise SelectorError(f"unable to parse requirement: {term.strip()!r}")
        negate, key, set_op, values, op, value = m.groups()
        if set_op:
            members = {v.strip() for v in values.split(",") if v.strip()}
            if set_op == "in":
                checks.append(lambda labels, k=key, s=members: labels.get(k) in s)
            else:
                checks.append(lambda labels, k=key, s=members: labels.get(k) not in s)
        elif op:
            wanted = value.strip()
            if op == "!=":
                checks.append(lambda labels, k=key, v=wanted: labels.get(k) != v)
            else:
                checks.append(lambda labels, k=key, v=wanted: labels.get(k) == v)
        elif negate:
            checks.append(lambda labels, k=key: k not in labels)
        else:
            checks.append(lambda labels, k=key: k in labels)

    def predicate(obj: dict[str, Any]) -> bool:
        labels = obj.get("metadata", {}).get("labels") or {}
        return all(check(labels) for check in checks)

    return predicate


def field_value(obj: dict[str, Any], path: str) -> str:
    value: Any = obj
    for part in path.split("."):
        if not isinstance(value, dict):
            return ""
        value = value.get(part)
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def field_predicate(selector: str) -> Predicate:
    terms = parse_field_selector(selector)
    if terms is None:
        raise SelectorError(f"invalid field selector: {selector!r}")
    if not terms:
        return lambda obj: True

    def predicate(obj: dict[str, Any]) -> bool:
        for field, op, value in terms:
            actual = field_value(obj, field)
            if (actual != value) if op != "!=" else (actual == value):
                return False
        return True

    return predicate
