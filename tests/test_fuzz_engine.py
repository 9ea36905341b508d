"""The nghttp2 binding under its fuzzer (bench/fuzz_engine.py): a short coverage-guided
run under AddressSanitizer finds nothing, and every input that once crashed it
(tests/fuzz_corpus/) is replayed. The long runs are the benchmark's (bench/README.md)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kom_gateway.http import engine as engines

ROOT = Path(__file__).resolve().parent.parent
FUZZ = ROOT / "bench" / "fuzz_engine.py"
CORPUS = sorted((ROOT / "tests" / "fuzz_corpus").iterdir())
REQUIRED = bool(os.environ.get("KOM_REQUIRE_CLIENTS"))


def _needs(what: str, present: bool) -> None:
    if not present:
        if REQUIRED:
            pytest.fail(f"needs {what}", pytrace=False)
        pytest.skip(f"needs {what}")


def _atheris() -> bool:
    try:
        import atheris  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.parametrize("crash", CORPUS, ids=lambda p: p.name)
def test_inputs_that_once_crashed_the_binding_do_not(crash):
    _needs("the nghttp2 engine", engines.nghttp2_missing() is None)
    _needs("atheris (PyPI)", _atheris())
    done = subprocess.run([sys.executable, str(FUZZ), "--reproduce", str(crash)],
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.timeout(180)
def test_a_short_fuzzing_run_under_asan_finds_nothing(tmp_path):
    _needs("the nghttp2 engine", engines.nghttp2_missing() is None)
    _needs("atheris (PyPI)", _atheris())
    _needs("clang (Debian clang-14)", any(shutil.which(c) for c in ("clang", "clang-14")))
    done = subprocess.run(
        [sys.executable, str(FUZZ), "--seconds", "20", "--asan", "--artifacts", str(tmp_path)],
        capture_output=True, text=True, timeout=170,
    )  # fmt: skip
    tail = (done.stdout + done.stderr)[-4000:]
    assert done.returncode == 0 and not list(tmp_path.iterdir()), tail
    executed = [line for line in tail.splitlines() if "number_of_executed_units" in line]
    assert executed and int(executed[-1].split()[-1]) > 1000, tail  # it really ran
