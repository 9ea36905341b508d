"""The one edit a rollout makes: set one cut-over rule's percent for one group in the
routing YAML (pure: text in, text out).

Only the characters the edit needs change: the number, a `group: value` added to the
rule's percent map, or the rule appended after the last one; the diff an operator (or a
GitOps tool) sees is that and nothing else. Where the layout is unusual, ruamel.yaml's
round trip (which keeps comments) does it instead. Either way the result must pass the
routing config's validation and equal the old document with exactly that one value
changed, or nothing is written."""

from __future__ import annotations

import io
import re
from collections.abc import Callable
from typing import Any

import yaml
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.scalarstring import DoubleQuotedScalarString
from ruamel.yaml.util import load_yaml_guess_indent

from kom_gateway.config.loader import load_config_text
from kom_gateway.config.model import Config, ConfigError
from kom_gateway.routing.cutover import CutoverRule

_PLAIN_NUMBER = re.compile(r"[0-9]+(?:\.[0-9]+)?(?=\s*[,}#\n]|\s*\Z)")


class EditError(Exception):
    """The edit was not made; the config is untouched."""


def number(percent: float) -> int | float:
    """25.0 -> 25, 12.5 -> 12.5: as an operator would write it."""
    return int(percent) if float(percent).is_integer() else float(percent)


def find_rule(config: Config, match: dict[str, str]) -> CutoverRule | None:
    for rule in config.cutover:
        if rule.match.as_json() == match:
            return rule
    return None


def current_percent(config: Config, match: dict[str, str], group: str) -> float:
    rule = find_rule(config, match)
    return rule.percent_for(group) if rule is not None else 0.0


def current_shadow(config: Config, match: dict[str, str]) -> dict[str, Any] | None:
    """The rule's `shadow` as written (None: off, or no such rule)."""
    rule = find_rule(config, match)
    if rule is None or rule.shadow is None:
        return None
    return {k: number(v) if isinstance(v, float) else v for k, v in rule.shadow.as_json().items()}


def set_shadow(
    text: str, match: dict[str, str], shadow: dict[str, Any] | None, group: str, source: str = ""
) -> str:
    """`text` with the rule matching `match` shadowing as `shadow` says (None: the key
    removed). A rule that is not there yet is appended, moving nobody (`group: 0`). As
    `set_percent`: one line changes where the layout allows, else a round trip; either
    way nothing but the rule's shadow (and that appended rule) may change."""
    validate(text, source)

    def set_it(rule: dict[str, Any]) -> None:
        if shadow is None:
            rule.pop("shadow", None)
        else:
            rule["shadow"] = dict(shadow)

    edited = _shadow_in_place(text, match, shadow, group)
    if edited is None:
        edited = _shadow_round_trip(text, match, shadow, group)
    if not _only_that_changed(text, edited, match, group, set_it):
        raise EditError("refusing the edit: it would change more than the rule's shadow")
    if current_shadow(validate(edited, source), match) != shadow:
        raise EditError("the edit did not take effect")
    return edited


def _shadow_in_place(
    text: str, match: dict[str, str], shadow: dict[str, Any] | None, group: str
) -> str | None:
    """The one line: `shadow: {...}` put after a one-line `match`, replaced, or removed
    (None: the layout needs the round trip)."""
    data = YAML().load(text)
    rule = _rule_node(data, match)
    if rule is None:
        if shadow is None:
            return text
        rules = data.get("cutover") if isinstance(data, CommentedMap) else None
        if not isinstance(rules, CommentedSeq) or not rules:
            return None
        appended = _append_rule(data, rules, _lines(text), match, group, 0)
        return None if appended is None else _shadow_in_place(appended, match, shadow, group)
    lines = _lines(text)
    line_of = {}
    for key in ("match", "shadow"):
        if key not in rule:
            continue
        line_of[key] = rule.lc.key(key)[0]
        value = rule[key]
        one_line = lines[line_of[key]].split("#", 1)[0].rstrip().endswith("}")
        if not (isinstance(value, CommentedMap) and value.fa.flow_style() and one_line):
            return None
    if "shadow" in rule:
        at = line_of["shadow"]
        if shadow is None:
            del lines[at]
        else:
            indent = lines[at][: len(lines[at]) - len(lines[at].lstrip())]
            lines[at] = f"{indent}shadow: {_flow_numbers(shadow)}\n"
        return "".join(lines)
    if shadow is None:
        return text
    at = line_of["match"]
    column = rule.lc.key("match")[1]
    lines.insert(at + 1, f"{' ' * column}shadow: {_flow_numbers(shadow)}\n")
    return "".join(lines)


def _lines(text: str) -> list[str]:
    """The document's lines, each ending in a newline (the last one too)."""
    lines = text.splitlines(keepends=True)
    if lines and not lines[-1].endswith("\n"):
        lines[-1] += "\n"
    return lines


def _flow_numbers(mapping: dict[str, Any]) -> str:
    return "{" + ", ".join(f"{k}: {v}" for k, v in mapping.items()) + "}"


def _shadow_round_trip(
    text: str, match: dict[str, str], shadow: dict[str, Any] | None, group: str
) -> str:
    yaml_rt = _round_tripper(text)
    data = yaml_rt.load(text)
    rule = _rule_or_new(data, match, group)
    if shadow is None:
        rule.pop("shadow", None)
    else:
        node = CommentedMap(shadow)
        node.fa.set_flow_style()
        rule["shadow"] = node
    return _dumped(yaml_rt, data)


def validate(text: str, source: str) -> Config:
    """What `kom-gateway check --no-files` says of the text (files are the gateway's)."""
    try:
        return load_config_text(text, source)
    except ConfigError as exc:
        raise EditError(f"the edited config would not pass check:\n{exc.render()}") from None


def set_percent(
    text: str, match: dict[str, str], group: str, percent: float, source: str = ""
) -> str:
    """`text` with the rule matching `match` moving `percent` of its clients to `group`
    (the rule appended, at the end of `cutover`, if there is none)."""
    before = validate(text, source)
    if group not in before.groups:
        raise EditError(f"the config has no group {group!r} (it has {', '.join(before.groups)})")
    value = number(percent)

    def set_it(rule: dict[str, Any]) -> None:
        if not isinstance(rule.get("percent"), dict):
            rule["percent"] = {}
        rule["percent"][group] = value

    edited = _edit_in_place(text, match, group, value)
    if edited is None or not _only_that_changed(text, edited, match, group, set_it):
        edited = _round_trip(text, match, group, value)
        if not _only_that_changed(text, edited, match, group, set_it):
            raise EditError("refusing the edit: it would change more than the one percent")
    after = validate(edited, source)
    if current_percent(after, match, group) != float(value):
        raise EditError("the edit did not take effect")
    return edited


def _same_match(node: Any, match: dict[str, str]) -> bool:
    m = node.get("match") if isinstance(node, dict) else None
    return isinstance(m, dict) and {k: str(v) for k, v in m.items() if v is not None} == match


def _rule_node(data: Any, match: dict[str, str]) -> Any:
    rules = data.get("cutover") if isinstance(data, dict) else None
    if not isinstance(rules, list):
        return None
    return next((node for node in rules if _same_match(node, match)), None)


def _quoted(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _flow(mapping: dict[str, str]) -> str:
    return "{" + ", ".join(f"{k}: {_quoted(v)}" for k, v in mapping.items()) + "}"


def _edit_in_place(text: str, match: dict[str, str], group: str, value: int | float) -> str | None:
    """The edit as a change of the few characters it needs (None: let the round trip
    do it): the number swapped, `group: value` added to the rule's percent map, or the
    rule appended after the last one."""
    data = YAML().load(text)
    lines = _lines(text)
    rules = data.get("cutover") if isinstance(data, CommentedMap) else None
    if not isinstance(rules, CommentedSeq) or not rules:
        return None
    rule = _rule_node(data, match)
    if rule is None:
        return _append_rule(data, rules, lines, match, group, value)
    percent = rule.get("percent")
    if not isinstance(percent, CommentedMap) or not percent:
        return None
    if group in percent:
        line, column = percent.lc.value(group)
        found = _PLAIN_NUMBER.match(lines[line], column)
        if found is None:  # quoted, or written some other way
            return None
        lines[line] = lines[line][: found.start()] + str(value) + lines[line][found.end() :]
        return "".join(lines)
    last = list(percent)[-1]
    if percent.fa.flow_style():
        line, column = percent.lc.value(last)
        close = lines[line].find("}", column)
        if close < 0:
            return None
        lines[line] = f"{lines[line][:close]}, {group}: {value}{lines[line][close:]}"
    else:
        key_line, key_column = percent.lc.key(last)
        lines.insert(key_line + 1, f"{' ' * key_column}{group}: {value}\n")
    return "".join(lines)


def _append_rule(
    data: CommentedMap,
    rules: CommentedSeq,
    lines: list[str],
    match: dict[str, str],
    group: str,
    value: int | float,
) -> str | None:
    """A new last rule, indented as the first one, before whatever follows `cutover`."""
    first_line, first_column = rules.lc.item(0)
    dash = lines[first_line].rfind("-", 0, first_column)
    if dash < 0:
        return None
    keys = list(data)
    after = keys.index("cutover") + 1
    at = data.lc.key(keys[after])[0] if after < len(keys) else len(lines)
    last_rule_line = rules.lc.item(len(rules) - 1)[0]
    while at - 1 > last_rule_line and lines[at - 1].lstrip()[:1] in ("", "#"):
        at -= 1  # blank lines and comments there introduce what follows
    gap = " " * (first_column - dash - 1)
    lines[at:at] = [
        f"{' ' * dash}-{gap}match: {_flow(match)}\n",
        f"{' ' * first_column}percent: {{{group}: {value}}}\n",
    ]
    return "".join(lines)


def _round_trip(text: str, match: dict[str, str], group: str, value: int | float) -> str:
    yaml_rt = _round_tripper(text)
    data = yaml_rt.load(text)
    _rule_or_new(data, match, group)["percent"][group] = value
    return _dumped(yaml_rt, data)


def _round_tripper(text: str) -> YAML:
    """ruamel.yaml's round trip, keeping the document's quotes and indentation."""
    _, indent, offset = load_yaml_guess_indent(text)
    indent, offset = indent or 2, offset or 0
    yaml_rt = YAML()
    yaml_rt.preserve_quotes = True
    yaml_rt.width = 4096  # never fold a long line the operator wrote
    yaml_rt.indent(mapping=max(2, indent - offset), sequence=indent, offset=offset)
    return yaml_rt


def _rule_or_new(data: CommentedMap, match: dict[str, str], group: str) -> CommentedMap:
    """The rule matching `match`, or a new last one moving nobody (`group: 0`); either
    way with a percent map."""
    if not isinstance(data.get("cutover"), list):
        data["cutover"] = CommentedSeq()
    rule = _rule_node(data, match)
    if rule is None:
        rule = CommentedMap()
        rule["match"] = CommentedMap({k: DoubleQuotedScalarString(v) for k, v in match.items()})
        rule["match"].fa.set_flow_style()
        rule["percent"] = CommentedMap({group: 0})
        rule["percent"].fa.set_flow_style()
        data["cutover"].append(rule)
    if not isinstance(rule.get("percent"), dict):
        rule["percent"] = CommentedMap()
        rule["percent"].fa.set_flow_style()
    return rule


def _dumped(yaml_rt: YAML, data: CommentedMap) -> str:
    out = io.StringIO()
    yaml_rt.dump(data, out)
    return out.getvalue()


def _only_that_changed(
    old: str, new: str, match: dict[str, str], group: str, change: Callable[[dict], None]
) -> bool:
    """The new document equals the old one with `change` made to the rule (the rule
    added first, moving nobody to `group`, if there was none)."""
    want = yaml.safe_load(old)
    want["cutover"] = want.get("cutover") or []
    rule = _rule_node(want, match)
    if rule is None:
        rule = {"match": dict(match), "percent": {group: 0}}
        want["cutover"].append(rule)
    change(rule)
    try:
        return bool(yaml.safe_load(new) == want)
    except yaml.YAMLError:
        return False
