"""Builds the optional compiled parts, as aiohttp builds its llhttp parser: compiled when
they can be, skipped with a warning when they cannot, and the package then runs on its
pure-Python fallbacks.

- The nghttp2 engine (kom_gateway/http/nghttp2/_nghttp2.pyx, Cython). It declares the part of
  libnghttp2's ABI it uses itself and links the runtime library `libnghttp2.so.14`
  (installed wherever curl is), so no -dev package is needed. Without it: the `h2` engine.
- The compiled core (kom_gateway/compiled.py lists the modules): the request path's
  type-annotated modules compiled by mypyc, one group. Without it: the same modules,
  interpreted. Built in place (`pip install -e .`), it first removes the previous
  in-place core and records what each source was (kom_gateway/_compiled.json), so that
  importing the package refuses an extension whose source changed since.

KOM_GATEWAY_NO_EXTENSIONS=1 skips both (to test the portable install).
"""

import importlib.util
import json
import os
from pathlib import Path
from types import ModuleType

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

HERE = Path(__file__).resolve().parent


def load_compiled_module() -> ModuleType:
    """kom_gateway/compiled.py, loaded on its own (it needs only the standard library;
    the package and its dependencies are not installed yet): the build half of its
    contract, what to compile and how to record it, lives there with the run half."""
    spec = importlib.util.spec_from_file_location(
        "kom_gateway_compiled_build", HERE / "kom_gateway" / "compiled.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


CORE = load_compiled_module()


def nghttp2_engine() -> list[Extension]:
    try:
        from Cython.Build import cythonize
    except ImportError:  # building without Cython (e.g. no build isolation): h2 only
        print("kom-gateway: Cython is not installed; the nghttp2 engine is not built")
        return []
    return cythonize(
        [
            Extension(
                "kom_gateway.http.nghttp2._nghttp2",
                ["kom_gateway/http/nghttp2/_nghttp2.pyx"],
                extra_compile_args=["-O2"],
                extra_link_args=["-l:libnghttp2.so.14"],
                optional=True,
            )
        ],
        compiler_directives={"language_level": "3"},
    )


def compiled_core() -> list[Extension]:
    paths = [str(CORE.source_path(m, HERE).relative_to(HERE)) for m in CORE.MODULES]
    record = CORE.build_record(HERE)  # what mypyc is about to read
    try:
        from mypyc.build import mypycify

        extensions = mypycify(paths, opt_level="3", group_name=CORE.GROUP)
    except (Exception, SystemExit) as exc:  # no mypyc, or they do not type-check (it
        # exits then, having printed mypy's errors): the core stays interpreted
        print(f"kom-gateway: the core is not compiled ({type(exc).__name__}: {exc})")
        return []
    for extension in extensions:
        extension.optional = True  # a failed C build leaves the interpreted core
    BuildExt.core_record = record
    return extensions


class BuildExt(build_ext):
    """An in-place build replaces the previous in-place core as a whole: none of it is
    left to run beside sources it was not built from (a failed build leaves none), and
    the record of the sources compiled is written once every module is built."""

    core_record: dict[str, object] | None = None  # None: the core is not being built

    def run(self) -> None:
        if not self.inplace:
            return super().run()
        record_path = HERE / "kom_gateway" / CORE.RECORD
        record_path.unlink(missing_ok=True)
        group = HERE / f"{CORE.GROUP}__mypyc{CORE.EXTENSION_SUFFIX}"
        built = [group, *(CORE.extension_path(m, HERE) for m in CORE.MODULES)]
        for path in built:
            path.unlink(missing_ok=True)
        super().run()
        if self.core_record is not None and all(path.exists() for path in built):
            record_path.write_text(json.dumps(self.core_record, indent=1) + "\n")


ext_modules: list[Extension] = []
if not os.environ.get("KOM_GATEWAY_NO_EXTENSIONS"):
    ext_modules = nghttp2_engine() + compiled_core()

setup(ext_modules=ext_modules, cmdclass={"build_ext": BuildExt})
