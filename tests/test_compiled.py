"""The compiled core (kom_gateway/compiled.py): built where the README's install runs, the
interpreted fallback chosen when asked, when nothing was built, or when a source changed
after the build; and the core's own tests pass on the fallback too."""

from __future__ import annotations

import importlib
import importlib.machinery
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kom_gateway import compiled

ROOT = Path(__file__).resolve().parent.parent
# the tests that drive the compiled modules: sans-IO cores, the in-process proxy and the
# protocol suite (each on both HTTP/2 engines)
CORE_TESTS = (
    "tests/test_requestinfo.py",
    "tests/test_identity.py",
    "tests/test_watchframes.py",
    "tests/test_routing.py",
    "tests/test_overload.py",
    "tests/test_fallback_policy.py",
    "tests/test_metrics.py",
    "tests/test_accesslog.py",
    "tests/test_proxy.py",
    "tests/test_fallback.py",
    "tests/test_overload_proxy.py",
    "tests/test_http2.py",
    "tests/test_hardening.py",
    "tests/test_engine_events.py",
)


def _is_extension(module: str) -> bool:
    origin = importlib.import_module(module).__file__ or ""
    return origin.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES))


def test_the_core_is_compiled_where_it_was_built():
    """On CI and on a fresh machine of this image the README's install compiles it."""
    if not compiled.is_compiled() and not os.environ.get("KOM_REQUIRE_CLIENTS"):
        pytest.skip(f"the core runs as {compiled.activate()} here")
    assert compiled.activate() == "compiled"
    assert all(_is_extension(m) for m in compiled.MODULES)


def test_modules_load_as_the_state_says():
    """(Also run by the fallback run below, where every module must be its source.)"""
    expected = compiled.is_compiled()
    assert [m for m in compiled.MODULES if _is_extension(m) != expected] == []
    if os.environ.get(compiled.PURE_ENV) == "1":
        assert compiled.activate() == f"pure Python ({compiled.PURE_ENV}=1)"


def test_the_compiled_modules_type_check_as_their_build_needs():
    """mypyc compiles only code mypy accepts (pyproject's [tool.mypy]); a type error
    would quietly leave the core interpreted."""
    paths = [str(compiled.source_path(m)) for m in compiled.MODULES]
    proc = subprocess.run(
        [sys.executable, "-m", "mypy", "--cache-dir", os.devnull, *paths],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_the_core_tests_pass_on_the_interpreted_core(tmp_path):
    env = dict(os.environ, **{compiled.PURE_ENV: "1"})
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-x",
         f"{Path(__file__).relative_to(ROOT)}::test_modules_load_as_the_state_says",
         *CORE_TESTS],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout


def _fake_build(root: Path, modules: tuple[str, ...] = compiled.MODULES) -> None:
    """A package tree at `root` with each module's source and an (empty) extension."""
    suffix = importlib.machinery.EXTENSION_SUFFIXES[0]
    for module in compiled.MODULES:
        source = compiled.source_path(module, root)
        source.parent.mkdir(parents=True, exist_ok=True)
        source.write_text(f"NAME = {module!r}\n")
        if module in modules:
            source.with_suffix(suffix).write_bytes(b"")


def _record(root: Path) -> None:
    record = compiled.build_record(root)
    (root / "kom_gateway" / compiled.MANIFEST).write_text(json.dumps(record))


def test_the_environment_variable_asks_for_the_sources(tmp_path):
    _fake_build(tmp_path)
    _record(tmp_path)
    reason = compiled.pure_reason({compiled.PURE_ENV: "1"}, tmp_path)
    assert reason == f"{compiled.PURE_ENV}=1"


def test_nothing_built_or_a_partial_build_runs_the_sources(tmp_path):
    _fake_build(tmp_path, modules=())
    assert "not compiled at install" in compiled.pure_reason({}, tmp_path)
    _fake_build(tmp_path, modules=compiled.MODULES[1:])
    _record(tmp_path)
    reason = compiled.pure_reason({}, tmp_path)
    assert reason == f"incomplete build: {compiled.MODULES[0]} not compiled"


def test_a_source_edited_after_the_build_sets_the_stale_extensions_aside(tmp_path):
    _fake_build(tmp_path)
    assert compiled.pure_reason({}, tmp_path) == f"no build record ({compiled.MANIFEST})"
    _record(tmp_path)
    edited = compiled.source_path(compiled.MODULES[2], tmp_path)
    edited.write_text(edited.read_text() + "# edited\n")
    reason = compiled.pure_reason({}, tmp_path)
    assert reason is not None and reason.startswith(f"stale build: {compiled.MODULES[2]} ")


def test_a_stale_build_runs_the_edited_source_in_a_real_process(tmp_path):
    """End to end, on a copy of the installed package: edit one compiled module's source
    and the process imports that source (with the warning), not the old extension."""
    if not compiled.is_compiled():
        pytest.skip(f"the core runs as {compiled.activate()} here")
    package = Path(compiled.__file__).parent
    copy = tmp_path / "kom_gateway"
    subprocess.run(["cp", "-r", str(package), str(copy)], check=True)
    target = compiled.source_path("kom_gateway.routing.claims", tmp_path)
    target.write_text(target.read_text() + "\nEDITED = True\n")
    group = importlib.import_module(f"{compiled.GROUP}__mypyc").__file__
    script = (
        "import kom_gateway.compiled as c, kom_gateway.routing.claims as m, "
        "kom_gateway.proxy.exchange as e\n"
        "print(c.activate()); print(m.EDITED, m.__file__, e.__file__)\n"
        "print(c.start_warning())\n"
    )
    env = dict(os.environ, PYTHONPATH=f"{tmp_path}:{Path(group).parent}")
    env.pop(compiled.PURE_ENV, None)
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    state, modules, warning = proc.stdout.splitlines()
    assert state.startswith("pure Python (stale build: kom_gateway.routing.claims changed")
    assert modules == f"True {target} {copy / 'proxy' / 'exchange.py'}"
    assert "Reinstall" in warning
