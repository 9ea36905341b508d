"""Glob matching: the reference semantics, and a cost linear in the client's string.

A cut-over or overload glob is matched against strings a client chooses (its
User-Agent, a namespace in its path). A backtracking regex made from `*/* (linux/*)
kubernetes/*` took 15 s on a 20 KB User-Agent, on the event loop: these tests keep that
closed.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import kom_gateway.routing.glob as glob_module
from kom_gateway.routing.glob import Glob

HOSTILE = [
    # (pattern, a unit repeated into a string that almost matches it, the string's end)
    ("*/* (linux/*) kubernetes/*", "x/ (linux/", ""),
    ("*a*a*a*a*a*b", "a", ""),
    ("*a?a?a?c*b", "aa", "b"),
    ("*?*?*?*?x", "ab", "x"),
    ("*[a-z]*[a-z]*[!a-z]*Z", "ab", "Z"),
    ("kube-*-*-*-*-end", "kube--", "-end"),
]


def _reference(pattern: str) -> re.Pattern[str]:
    """The semantics, as a regex (fine for the short strings of the property test)."""
    out, i, n = [], 0, len(pattern)
    if not pattern:
        raise ValueError("empty")
    while i < n:
        c = pattern[i]
        i += 1
        if c == "*":
            out.append(".*")
        elif c == "?":
            out.append(".")
        elif c == "\\":
            if i == n:
                raise ValueError("lone backslash")
            out.append(re.escape(pattern[i]))
            i += 1
        elif c == "[":
            j = i
            negate = j < n and pattern[j] in "!^"
            j += negate
            members, first = [], True
            while True:
                if j >= n:
                    raise ValueError("unclosed")
                ch = pattern[j]
                if ch == "]" and not first:
                    j += 1
                    break
                first = False
                if ch == "\\":
                    if j + 1 >= n:
                        raise ValueError("lone backslash")
                    ch = pattern[j + 1]
                    j += 1
                if j + 2 < n and pattern[j + 1] == "-" and pattern[j + 2] != "]":
                    if pattern[j + 2] < ch:
                        raise ValueError("bad range")
                    members.append(f"{re.escape(ch)}-{re.escape(pattern[j + 2])}")
                    j += 3
                else:
                    members.append(re.escape(ch))
                    j += 1
            out.append(("[^" if negate else "[") + "".join(members) + "]")
            i = j
        else:
            out.append(re.escape(c))
    return re.compile("".join(out), re.DOTALL)


_PATTERN_CHARS = st.sampled_from(list("ab/ *?[]!-\\z"))
_TEXT_CHARS = st.sampled_from(list("ab/ z-]![\\*"))


@settings(max_examples=3000, deadline=None)
@given(st.text(_PATTERN_CHARS, min_size=0, max_size=12), st.text(_TEXT_CHARS, max_size=14))
def test_glob_agrees_with_the_reference_semantics(pattern, text):
    try:
        expected = _reference(pattern).fullmatch(text) is not None
    except ValueError:
        with pytest.raises(ValueError):
            Glob(pattern)
        return
    assert Glob(pattern).matches(text) is expected


@pytest.mark.parametrize(("pattern", "text"), [(p, u * 50 + e) for p, u, e in HOSTILE])
def test_glob_agrees_with_the_reference_on_hostile_strings(pattern, text):
    assert Glob(pattern).matches(text) is (_reference(pattern).fullmatch(text) is not None)


def _source_module():
    """routing/glob.py loaded from its source (the installed one may be compiled, and
    compiled code runs no Python lines to count)."""
    spec = importlib.util.spec_from_file_location(
        "glob_source", Path(glob_module.__file__).parent / "glob.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _steps(matches, text: str) -> int:
    """Python lines run by one match: the work the matcher does in Python (the rest is
    str.find/startswith, linear in C)."""
    count = 0

    def tracer(frame, event, arg):
        nonlocal count
        if event == "line":
            count += 1
        return tracer

    sys.settrace(tracer)
    try:
        matches(text)
    finally:
        sys.settrace(None)
    return count


@pytest.mark.parametrize(("pattern", "unit", "end"), HOSTILE)
def test_glob_work_is_linear_in_the_text(pattern, unit, end):
    source = _source_module()
    glob = source.Glob(pattern)
    small = _steps(glob.matches, unit * 200 + end)
    large = _steps(glob.matches, unit * 800 + end)
    # 4x the text: about 4x the steps (a quadratic matcher takes 16x), and a bounded
    # number of steps per character of text and pattern
    assert large <= 4.2 * small + 100
    assert large <= 8 * len(unit * 800) * len(pattern) + 100


def test_hostile_strings_cost_no_more_than_their_length():
    """The shipped matcher (compiled where it was built) on 1 MB hostile strings, in a
    child process with a CPU-time limit: a backtracking matcher needs hours for these
    (cubic: 15 s at 20 KB), a linear one milliseconds."""
    script = textwrap.dedent(
        f"""
        import resource
        resource.setrlimit(resource.RLIMIT_CPU, (20, 20))
        from kom_gateway.routing.glob import Glob
        for pattern, unit, end in {HOSTILE!r}:
            text = unit * (1_000_000 // len(unit)) + end
            glob = Glob(pattern)
            for _ in range(5):
                glob.matches(text)
        print("ok")
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def test_star_only_globs_look_at_nothing():
    source = _source_module()
    assert _steps(source.Glob("*").matches, "x" * 100_000) == _steps(
        source.Glob("*").matches, "x"
    )
    assert source.Glob("***").matches("anything")


# -- every regex the gateway runs, audited ----------------------------------------------
# Each pattern compiled in kom_gateway/ (the simulator aside: test equipment), with what
# it is matched against. Those that see a client's string must be linear in it: no
# nested or adjacent quantifiers over overlapping characters. A new regex fails this test
# until it is added here, with its reason.
AUDITED = {
    # client strings, each linear: one character class, or a fixed-length lookahead
    ("kube/requestinfo.py", r"[\x00-\x1f\x7f]"): "client path: one character, searched",
    ("kube/requestinfo.py", r"%(?![0-9A-Fa-f]{2})"): "client query: fixed-length lookahead",
    ("http/h2/validate.py", rb"[!#$%&'*+\-.^_`|~0-9a-z]+\Z"): "client header name: one class",
    ("http/h2/validate.py", rb"[\x00\r\n]|\A[ \t]|[ \t]\Z"): "client header value: fixed",
    # operator input only (config and rollout files), never a client's
    ("config/schema.py", r"[A-Za-z0-9][A-Za-z0-9-]*\Z"): "config",
    ("config/schema.py", r"[a-z0-9]([-a-z0-9]*[a-z0-9])?\Z"): "config",
    ("routing/claims.py", r"[a-z0-9]([-a-z0-9]*[a-z0-9])?\Z"): "config",
    (
        "routing/claims.py",
        r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*\Z",
    ): "config",
    ("rollout/spec.py", r"(\d+(?:\.\d+)?)(ms|s|m|h)"): "rollout spec",
    ("rollout/edit.py", r"[0-9]+(?:\.[0-9]+)?(?=\s*[,}#\n]|\s*\Z)"): "config file edit",
}


def test_every_regex_is_audited():
    import ast

    package = Path(glob_module.__file__).resolve().parent.parent
    found = set()
    for path in package.rglob("*.py"):
        rel = path.relative_to(package).as_posix()
        if rel.startswith("sim/"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and isinstance(node.func.value, ast.Name)
                and node.func.value.id == "re"
            ):
                first = node.args[0] if node.args else None
                assert isinstance(first, ast.Constant), f"{rel}: a regex built at run time"
                found.add((rel, first.value))
    assert found == set(AUDITED), f"unaudited: {found - set(AUDITED)}"
