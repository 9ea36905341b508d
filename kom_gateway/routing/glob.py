"""Shell-style globs for cut-over and overload matches, parsed once at config load.

`*` matches any run of characters (including `/` and none), `?` one character,
`[abc]` / `[a-z]` / `[!abc]` one character of (or not of) a set, and `\\` takes the
next character literally. Matching is case-sensitive and covers the whole string.

The text matched is the client's (its User-Agent, a namespace from its path), so the
matcher must cost time linear in it whatever the pattern: no backtracking regex. A glob
is split at its stars into segments; the first must match at the start, the last at the
end, and each one between at its leftmost place after the one before (a star can absorb
anything, so the leftmost place never loses a match). Every character of the text is
then the start of at most one search step per segment: O(len(text) x len(pattern)), the
pattern being the operator's. Segments without `?` or `[...]` are found by `str.find`,
`startswith` and `endswith`; a glob that is only stars matches without looking.
"""

from __future__ import annotations


class _Class:
    """`[...]`: one character in (or, negated, not in) a set of ranges."""

    __slots__ = ("negate", "ranges")

    def __init__(self, ranges: list[tuple[str, str]], negate: bool) -> None:
        self.ranges = ranges
        self.negate = negate

    def has(self, c: str) -> bool:
        for lo, hi in self.ranges:
            if lo <= c <= hi:
                return not self.negate
        return self.negate


# One position of a segment: a literal character, None for `?`, or a class.
_Atom = str | None | _Class


class _Segment:
    """The atoms between two stars (or an end of the pattern)."""

    __slots__ = ("atoms", "literal", "size")

    def __init__(self, atoms: list[_Atom]) -> None:
        self.atoms = atoms
        self.size = len(atoms)
        # All literal: matched by the str methods (in C); else None.
        chars = [a for a in atoms if isinstance(a, str)]
        self.literal: str | None = "".join(chars) if len(chars) == len(atoms) else None

    def at(self, text: str, pos: int) -> bool:
        """Whether the segment matches `text` at `pos` (which leaves room for it)."""
        if self.literal is not None:
            return text.startswith(self.literal, pos)
        i = pos
        for atom in self.atoms:
            c = text[i]
            if atom is None:
                pass
            elif isinstance(atom, str):
                if c != atom:
                    return False
            elif not atom.has(c):
                return False
            i += 1
        return True

    def find(self, text: str, start: int, end: int) -> int:
        """The leftmost place in [start, end - size] where the segment matches, or -1."""
        if self.literal is not None:
            return text.find(self.literal, start, end)
        for pos in range(start, end - self.size + 1):
            if self.at(text, pos):
                return pos
        return -1


class Glob:
    """A validated, parsed glob pattern."""

    __slots__ = ("_first", "_last", "_middle", "_starred", "pattern")

    def __init__(self, pattern: str) -> None:
        self.pattern = pattern
        segments = _parse(pattern)
        self._starred = len(segments) > 1  # at least one star
        self._first = segments[0]
        self._last = segments[-1]
        self._middle = segments[1:-1]

    def matches(self, text: str) -> bool:
        first, last = self._first, self._last
        n = len(text)
        if not self._starred:
            return n == first.size and first.at(text, 0)
        end = n - last.size  # where the last segment must start
        if end < first.size or not first.at(text, 0) or not last.at(text, end):
            return False
        pos = first.size
        for segment in self._middle:
            found = segment.find(text, pos, end)
            if found < 0:
                return False
            pos = found + segment.size
        return True

    def __repr__(self) -> str:
        return f"Glob({self.pattern!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Glob) and other.pattern == self.pattern

    def __hash__(self) -> int:
        return hash(self.pattern)


def _parse(pattern: str) -> list[_Segment]:
    """Glob -> segments between its stars; ValueError names what is wrong with the glob."""
    if not pattern:
        raise ValueError('empty pattern (use "*" to match anything)')
    segments: list[_Segment] = []
    atoms: list[_Atom] = []
    i, n = 0, len(pattern)
    while i < n:
        c = pattern[i]
        i += 1
        if c == "*":
            segments.append(_Segment(atoms))
            atoms = []
        elif c == "?":
            atoms.append(None)
        elif c == "\\":
            if i == n:
                raise ValueError("pattern ends with a lone backslash")
            atoms.append(pattern[i])
            i += 1
        elif c == "[":
            i, cls = _character_class(pattern, i)
            atoms.append(cls)
        else:
            atoms.append(c)
    segments.append(_Segment(atoms))
    if len(segments) == 1:
        return segments
    # "a**b" is "a*b": an empty segment between two stars constrains nothing
    return [segments[0], *(s for s in segments[1:-1] if s.size), segments[-1]]


def _character_class(pattern: str, start: int) -> tuple[int, _Class]:
    """Parse `[...]` whose body starts at `start`; return (index after `]`, the class)."""
    i = start
    negate = i < len(pattern) and pattern[i] in "!^"
    if negate:
        i += 1
    ranges: list[tuple[str, str]] = []
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
            ranges.append((c, hi))
            i += 3
        else:
            ranges.append((c, c))
            i += 1
    return i, _Class(ranges, negate)
