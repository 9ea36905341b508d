"""Shell-style globs for cut-over matches, compiled once at config load.

`*` matches any run of characters (including `/` and none), `?` one character,
`[abc]` / `[a-z]` / `[!abc]` one character of (or not of) a set, and `\\` takes the
next character literally. Matching is case-sensitive and covers the whole string.
"""

from __future__ import annotations

import re


class Glob:
    """A validated, compiled glob pattern."""

    __slots__ = ("_regex", "pattern")

    def __init__(self, pattern: str) -> None:
        self.pattern = pattern
        self._regex = re.compile(_translate(pattern), re.DOTALL)

    def matches(self, text: str) -> bool:
        return self._regex.fullmatch(text) is not None

    def __repr__(self) -> str:
        return f"Glob({self.pattern!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Glob) and other.pattern == self.pattern

    def __hash__(self) -> int:
        return hash(self.pattern)


def _translate(pattern: str) -> str:
    """Glob -> regex source; ValueError names what is wrong with the glob."""
    if not pattern:
        raise ValueError('empty pattern (use "*" to match anything)')
    out: list[str] = []
    i, n = 0, len(pattern)
    while i < n:
        c = pattern[i]
        i += 1
        if c == "*":
            if not (out and out[-1] == ".*"):
                out.append(".*")
        elif c == "?":
            out.append(".")
        elif c == "\\":
            if i == n:
                raise ValueError("pattern ends with a lone backslash")
            out.append(re.escape(pattern[i]))
            i += 1
        elif c == "[":
            end, cls = _character_class(pattern, i)
            out.append(cls)
            i = end
        else:
            out.append(re.escape(c))
    return "".join(out)


def _character_class(pattern: str, start: int) -> tuple[int, str]:
    """Parse `[...]` whose body starts at `start`; return (index after `]`, regex)."""
    i = start
    negate = i < len(pattern) and pattern[i] in "!^"
    if negate:
        i += 1
    members: list[str] = []
    first = True
    while True:
        if i >= len(pattern):
            raise ValueError(f"unclosed '[' at position {start}")
        c = pattern[i]
        if c == "]" and not first:
            i += 1
            break
        first = False
        if c == "\\":
            if i + 1 >= len(pattern):
                raise ValueError("pattern ends with a lone backslash")
            c = pattern[i + 1]
            i += 1
        if i + 2 < len(pattern) and pattern[i + 1] == "-" and pattern[i + 2] != "]":
            hi = pattern[i + 2]
            if hi < c:
                raise ValueError(f"bad range {c}-{hi} in '[...]'")
            members.append(f"{re.escape(c)}-{re.escape(hi)}")
            i += 3
        else:
            members.append(re.escape(c))
            i += 1
    return i, ("[^" if negate else "[") + "".join(members) + "]"
