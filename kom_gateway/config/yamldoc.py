"""YAML text -> plain Python values plus the line each value came from.

Validation errors must name the YAML path *and* the line, so the config is composed to
nodes (which carry marks) and converted by hand. Duplicate keys, which PyYAML would
silently collapse, are reported; alias expansion is bounded (no billion-laughs).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import yaml

YamlPath = tuple[str | int, ...]
MAX_NODES = 200_000
MAX_DEPTH = 64
_MAP_TAG = "tag:yaml.org,2002:map"
_SEQ_TAG = "tag:yaml.org,2002:seq"


class YamlError(Exception):
    """The text is not a YAML document we can use."""

    def __init__(self, message: str, line: int = 0, path: YamlPath = ()) -> None:
        super().__init__(message)
        self.message = message
        self.line = line
        self.path = path


class YamlDocument(NamedTuple):
    data: Any
    lines: dict[YamlPath, int]


# libyaml's scanner when PyYAML was built with it (its wheels are): ~10x faster than the
# pure-Python one, which takes seconds for a few thousand cut-over rules.
_Loader: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def parse_yaml(text: str) -> YamlDocument:
    loader: yaml.SafeLoader | None = None
    try:
        loader = _Loader(text)
        node = loader.get_single_node()
        if node is None:
            raise YamlError("the document is empty")
        lines: dict[YamlPath, int] = {}
        budget = [MAX_NODES]
        data = _convert(loader, node, (), lines, budget)
        return YamlDocument(data, lines)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        problem = exc.problem or str(exc)
        line = mark.line + 1 if mark else 0
        if "maximum nesting depth" in problem:  # libyaml's own limit
            raise YamlError("invalid YAML: nested too deeply", line) from None
        if exc.context:
            problem = f"{problem} ({exc.context})"
        raise YamlError(f"invalid YAML: {problem}", line) from None
    except yaml.YAMLError as exc:
        raise YamlError(f"invalid YAML: {exc}") from None
    except RecursionError:
        raise YamlError("invalid YAML: nested too deeply") from None
    finally:
        if loader is not None:
            loader.dispose()


def _convert(
    loader: yaml.SafeLoader,
    node: yaml.Node,
    path: YamlPath,
    lines: dict[YamlPath, int],
    budget: list[int],
) -> Any:
    budget[0] -= 1
    if budget[0] < 0:
        raise YamlError(f"document too large (more than {MAX_NODES} values after aliases)")
    line = node.start_mark.line + 1
    if len(path) > MAX_DEPTH:
        raise YamlError(f"nested deeper than {MAX_DEPTH} levels (or a recursive alias)", line)
    lines[path] = line
    if isinstance(node, yaml.CollectionNode) and node.tag not in (_MAP_TAG, _SEQ_TAG):
        raise YamlError(f"unsupported YAML tag {node.tag!r}", line, path)
    if isinstance(node, yaml.MappingNode):
        out: dict[str, Any] = {}
        for key_node, value_node in node.value:
            key_line = key_node.start_mark.line + 1
            if not isinstance(key_node, yaml.ScalarNode):
                raise YamlError("mapping keys must be plain strings", key_line, path)
            key = str(key_node.value)
            if key in out:
                raise YamlError(f"duplicate key {key!r}", key_line, (*path, key))
            out[key] = _convert(loader, value_node, (*path, key), lines, budget)
            lines[(*path, key)] = key_line
        return out
    if isinstance(node, yaml.SequenceNode):
        return [
            _convert(loader, item, (*path, i), lines, budget) for i, item in enumerate(node.value)
        ]
    constructor = loader.yaml_constructors.get(node.tag)
    if constructor is None:
        raise YamlError(f"unsupported YAML tag {node.tag!r}", line, path)
    try:
        return constructor(loader, node)
    except (yaml.YAMLError, ValueError, TypeError) as exc:
        raise YamlError(f"bad value: {exc}", line, path) from None


def kind_of(value: Any) -> str:
    """What a YAML value is, in words, for error messages."""
    names: dict[type, str] = {
        dict: "a mapping",
        list: "a list",
        str: "a string",
        bool: "a boolean",
        int: "a number",
        float: "a number",
        type(None): "nothing",
    }
    return names.get(type(value), type(value).__name__)
