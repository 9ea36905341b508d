"""The compiled core (kom_gateway/compiled.py): built where the README's install runs; the
interpreted sources run where nothing was built, and pass the core's own tests; an
extension whose source changed after its build never runs (the import refuses it)."""

from __future__ import annotations

import importlib
import importlib.machinery
import json
import os
import shutil
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


def _is_extension(module: str) -> bool:
    origin = importlib.import_module(module).__file__ or ""
    return origin.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES))


def test_the_core_is_compiled_where_it_was_built():
    """On CI and on a fresh machine of this image the README's install compiles it, in
    place, with the record of what it compiled."""
    if not compiled.is_compiled() and not os.environ.get("KOM_REQUIRE_CLIENTS"):
        pytest.skip(f"the core runs {compiled.core()} here")
    assert compiled.core() == "compiled"
    assert all(_is_extension(m) for m in compiled.MODULES)
    if compiled.ROOT == ROOT:  # an editable checkout (not an installed wheel)
        assert set(
            json.loads((ROOT / "kom_gateway" / compiled.RECORD).read_text())["sources"]
        ) == set(compiled.MODULES)


def test_modules_load_as_the_state_says():
    """(Also run by the interpreted run below, where every module must be its source.)"""
    expected = compiled.is_compiled()
    assert [m for m in compiled.MODULES if _is_extension(m) != expected] == []


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


def _copy_package(to: Path, *, core: bool) -> Path:
    """A copy of the running package at `to`/kom_gateway (file times not kept, as a
    wheel's install does not keep them); without the compiled core unless `core`."""
    package = Path(compiled.__file__).parent
    core_files = {compiled.extension_path(m, package.parent) for m in compiled.MODULES}

    def skipped(directory: str, names: list[str]) -> set[str]:
        if core:
            return {"__pycache__"} & set(names)
        return {n for n in names if n == "__pycache__" or n == compiled.RECORD
                or Path(directory, n) in core_files}  # fmt: skip

    shutil.copytree(package, to / "kom_gateway", ignore=skipped, copy_function=shutil.copyfile)
    return to / "kom_gateway"


def _python(*args: str, root: Path, group: bool = False) -> subprocess.CompletedProcess[str]:
    """python -P (the working directory off sys.path) with `root` first on sys.path, and
    the compiled group's runtime importable when `group`."""
    path = [str(root)]
    if group:
        path.append(str(Path(importlib.import_module(f"{compiled.GROUP}__mypyc").__file__).parent))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(path))
    return subprocess.run([sys.executable, "-P", *args], cwd=root, env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip


def test_the_core_tests_pass_on_the_interpreted_core(tmp_path):
    """The portable install (no compiler): the same package without the core's
    extensions (the nghttp2 binding kept, so both engines run)."""
    copy = _copy_package(tmp_path, core=False)
    state = _python("-c", "import kom_gateway.compiled as c; print(c.core(), c.__file__)",
                    root=tmp_path)  # fmt: skip
    assert state.stdout.split() == [
        "interpreted",
        "(not",
        "compiled",
        "at",
        "install:",
        "no",
        "C",
        "compiler",
        "or",
        "mypyc)",
        str(copy / "compiled.py"),
    ]
    proc = _python("-m", "pytest", "-p", "no:cacheprovider", "-x",
                   f"{ROOT / 'tests' / 'test_compiled.py'}::test_modules_load_as_the_state_says",
                   *(str(ROOT / t) for t in CORE_TESTS), root=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout


def _fake_build(root: Path, modules: tuple[str, ...] = compiled.MODULES) -> None:
    """A package tree at `root` with each module's source and an (empty) extension."""
    for module in compiled.MODULES:
        source = compiled.source_path(module, root)
        source.parent.mkdir(parents=True, exist_ok=True)
        source.write_text(f"NAME = {module!r}\n")
        if module in modules:
            compiled.extension_path(module, root).write_bytes(b"")


def _record(root: Path) -> None:
    record = compiled.build_record(root)
    (root / "kom_gateway" / compiled.RECORD).write_text(json.dumps(record))


def test_nothing_built_runs_the_sources_and_a_partial_build_is_refused(tmp_path):
    _fake_build(tmp_path, modules=())
    assert compiled.check(tmp_path).startswith("interpreted (not compiled at install")
    _fake_build(tmp_path, modules=compiled.MODULES[1:])
    with pytest.raises(compiled.StaleBuild, match=f"partial \\({compiled.MODULES[0]} not"):
        compiled.check(tmp_path)


def test_an_installed_build_runs_and_an_in_place_one_runs_while_its_sources_are_unchanged(
    tmp_path,
):
    _fake_build(tmp_path)
    assert compiled.check(tmp_path) == "compiled"  # installed: no record
    _record(tmp_path)
    assert compiled.check(tmp_path) == "compiled"
    touched = compiled.source_path(compiled.MODULES[3], tmp_path)
    os.utime(touched, ns=(1, 1))  # the same bytes with another mtime (a checkout): hashed
    assert compiled.check(tmp_path) == "compiled"


@pytest.mark.parametrize("edit", ["appended", "same size"])
def test_a_source_edited_after_an_in_place_build_is_refused(tmp_path, edit):
    _fake_build(tmp_path)
    _record(tmp_path)
    edited = compiled.source_path(compiled.MODULES[2], tmp_path)
    stat = edited.stat()
    text = edited.read_text()
    edited.write_text(text + "# edited\n" if edit == "appended" else text.replace("N", "M"))
    if edit == "same size":  # even with the mtime it had: only the hash tells
        os.utime(edited, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))
    with pytest.raises(compiled.StaleBuild, match=f"^{compiled.MODULES[2]} changed after"):
        compiled.check(tmp_path)
    (tmp_path / "kom_gateway" / compiled.RECORD).write_text("{")
    with pytest.raises(compiled.StaleBuild, match="unreadable"):
        compiled.check(tmp_path)


def test_a_stale_build_never_runs_in_a_real_process(tmp_path):
    """End to end, on a copy of the built package and its record: unchanged it runs
    compiled; edit one compiled module's source and every command refuses to start,
    saying which module and how to rebuild, instead of running the old extension."""
    if not compiled.is_compiled():
        pytest.skip(f"the core runs {compiled.core()} here")
    copy = _copy_package(tmp_path, core=True)
    if not (copy / compiled.RECORD).exists():
        pytest.skip("an installed build (no in-place record): its sources are not edited")
    script = "import kom_gateway.compiled as c, kom_gateway.proxy.exchange as e; print(c.core(), e.__file__)"
    ran = _python("-c", script, root=tmp_path, group=True)
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.split()[0] == "compiled" and ran.stdout.split()[1].endswith(
        compiled.EXTENSION_SUFFIX
    )
    target = compiled.source_path("kom_gateway.routing.claims", tmp_path)
    target.write_text(target.read_text() + "\nEDITED = True\n")
    for args in (["-c", script], ["-m", "kom_gateway", "check", "--help"]):
        refused = _python(*args, root=tmp_path, group=True)
        assert refused.returncode != 0 and refused.stdout == ""
        assert (
            "StaleBuild: kom_gateway.routing.claims changed after the compiled core was built"
            in refused.stderr
            and "pip install -e . rebuilds it" in refused.stderr
        )
