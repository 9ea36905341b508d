"""Third-party internals are reached only through kom_gateway/compat.py, on the versions
they were tested with: pyproject.toml states the same bounds, the installed versions are
inside them, and every internal compat uses is still there."""

from __future__ import annotations

import ast
import tomllib
from importlib.metadata import version
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version

from kom_gateway import compat

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "kom_gateway"
THIRD_PARTY = ("h2", "hpack", "hyperframe", "aiohttp", "multidict", "prometheus_client",
               "uvloop", "yaml", "ruamel")  # fmt: skip


def _requirements() -> dict[str, Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = (Requirement(line) for line in project["dependencies"])
    return {r.name.lower(): r for r in reqs}


def test_pyproject_states_the_bounds_compat_was_tested_on():
    stated = _requirements()
    for name, bound in compat.BOUNDS.items():
        assert name in stated, f"{name} is reached into but not a dependency"
        assert str(stated[name].specifier) == str(Requirement(f"{name}{bound}").specifier)


def test_the_installed_versions_are_inside_the_bounds():
    outside = {
        name: version(name)
        for name, bound in compat.BOUNDS.items()
        if Version(version(name)) not in Requirement(f"{name}{bound}").specifier
    }
    assert outside == {}, "installed outside the tested bounds (see compat.py to widen)"


def test_every_internal_compat_uses_is_still_there():
    assert compat.missing() == []


def _private_uses(path: Path) -> list[str]:
    """`x._name` where x is an imported third-party module or an object of one, as far as
    names tell: attributes with one leading underscore read off anything but self/cls."""
    tree = ast.parse(path.read_text())
    found = []
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and node.attr.startswith("_")
            and not node.attr.startswith("__")
        ):
            base = node.value
            while isinstance(base, ast.Attribute):
                base = base.value
            root = base.id if isinstance(base, ast.Name) else ""
            if root in THIRD_PARTY:
                found.append(f"{path.relative_to(ROOT)}:{node.lineno} {ast.unparse(node)}")
    return found


def test_no_module_but_compat_touches_a_library_private():
    """Module-level reach-ins (`hpack.hpack.decode_huffman = ...`, `h2.x._y`) and the
    private methods overridden in subclasses of library classes live in compat.py."""
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if path.name == "compat.py":
            continue
        offenders += _private_uses(path)
        source = path.read_text()
        for needle in ("_receive_goaway_frame", "._drain_helper", "._request_count",
                       "._inbound_flow_control_window_manager", "._upper_bounds", "child._buckets",
                       "_data_to_send +=", "hpack.hpack.", "server._loop", "self._kwargs",
                       "site._server"):  # fmt: skip
            if needle in source:
                offenders.append(f"{path.relative_to(ROOT)}: {needle}")
    assert offenders == []


def test_compat_batches_histograms_as_observe_would():
    from prometheus_client import CollectorRegistry, Histogram

    registry = CollectorRegistry()
    batched = Histogram("batched", "", buckets=(0.1, 1.0), registry=registry)
    observed = Histogram("observed", "", buckets=(0.1, 1.0), registry=registry)
    values = [0.05, 0.5, 0.5, 3.0]
    counts = [sum(values), 1.0, 2.0, 1.0]
    compat.histogram_add(batched, counts)
    for value in values:
        observed.observe(value)
    assert compat.histogram_upper_bounds(batched) == [0.1, 1.0, float("inf")]

    def samples(name: str) -> list:
        return [(s.name.split("_", 1)[1], s.labels, s.value)
                for m in registry.collect() if m.name == name for s in m.samples
                if not s.name.endswith("_created")]  # fmt: skip

    assert samples("batched") == samples("observed")
