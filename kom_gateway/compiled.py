"""The compiled core: the request path's modules, compiled by mypyc at install, as mypy
and black ship theirs; their Python sources are the portable fallback.

mypyc turns these type-annotated modules into C extensions: native classes (attributes
at fixed offsets) and calls between them in C. A proxied request costs ~40% fewer
instructions (bench/README.md, "Fifth round"). They are compiled as one group whose
modules call each other natively, so it is all of them or none. Each extension sits
beside its source and Python's own importer prefers it; nothing else decides. So:

- a wheel or `pip install .` runs the extensions: installed files are not edited;
- an install with no C compiler or no mypyc (or `KOM_GATEWAY_NO_EXTENSIONS=1`) built
  none and runs the sources;
- an editable checkout (`pip install -e .`) is compiled in place, and there a source
  can change after its build. `check()` runs when the package is imported, before any
  of these modules: if one of their sources is not what was compiled, the import fails
  with the command that rebuilds, rather than running the old extension. The in-place
  build records each source's size, mtime and SHA-256 in `_compiled.json` (the
  checkout's files only; a wheel has none); a matching size and mtime are trusted, as
  Python trusts them for its .pyc files, and only a changed mtime costs a hash.
"""

from __future__ import annotations

import hashlib
import json
import os
import sysconfig
from functools import cache
from pathlib import Path

# What a proxied request runs in Python. setup.py reads this list.
MODULES = (
    "kom_gateway.kube.requestinfo",
    "kom_gateway.kube.identity",
    "kom_gateway.tokenbucket",
    "kom_gateway.config.holder",
    "kom_gateway.routing.claims",
    "kom_gateway.routing.glob",
    "kom_gateway.routing.cutover",
    "kom_gateway.routing.router",
    "kom_gateway.overload.policy",
    "kom_gateway.overload.admission",
    "kom_gateway.overload.clientshare",
    "kom_gateway.overload.ratelimit",
    "kom_gateway.proxy.intake",
    "kom_gateway.proxy.context",
    "kom_gateway.proxy.exchange",
    "kom_gateway.proxy.attempts",
    "kom_gateway.proxy.fallback",
    "kom_gateway.proxy.upstreams",
    "kom_gateway.proxy.health",
    "kom_gateway.proxy.headers",
    "kom_gateway.proxy.watchframes",
    "kom_gateway.proxy.outcome",
    "kom_gateway.proxy.metrics",
    "kom_gateway.proxy.accesslog",
    # the nghttp2 engine's Python and the bases it shares with the h2 and HTTP/1.1
    # engines. Those stay interpreted (they extend h2's and aiohttp's classes), so these
    # bases allow interpreted subclasses: mypyc gives such children a vtable of their own
    # and compiled instances keep theirs.
    "kom_gateway.http.stream",
    "kom_gateway.http.events",
    "kom_gateway.http.transport",
    "kom_gateway.http.serverconn",
    "kom_gateway.http.client",
    "kom_gateway.http.nghttp2.session",
    "kom_gateway.http.nghttp2.server",
    "kom_gateway.http.nghttp2.client",
)
GROUP = "kom_gateway_core"  # mypyc's group name: its runtime is `kom_gateway_core__mypyc`
RECORD = "_compiled.json"  # an in-place build's {"sources": {module: [size, mtime_ns, sha256]}}
ROOT = Path(__file__).resolve().parent.parent  # the directory holding the package
EXTENSION_SUFFIX: str = sysconfig.get_config_var("EXT_SUFFIX")  # what setuptools writes
REBUILD = "pip install -e . rebuilds it"


class StaleBuild(ImportError):
    """The compiled core on disk is not what its sources say: it must not run."""


def source_path(module: str, root: Path = ROOT) -> Path:
    return root.joinpath(*module.split(".")).with_suffix(".py")


def extension_path(module: str, root: Path = ROOT) -> Path:
    return source_path(module, root).with_suffix(EXTENSION_SUFFIX)


def _stamp(source: Path) -> list[int | str]:
    stat = source.stat()
    return [stat.st_size, stat.st_mtime_ns, hashlib.sha256(source.read_bytes()).hexdigest()]


def build_record(root: Path = ROOT) -> dict[str, dict[str, list[int | str]]]:
    """What an in-place build writes to RECORD, taken before it compiles (setup.py)."""
    return {"sources": {m: _stamp(source_path(m, root)) for m in MODULES}}


def _unchanged(source: str, stamp: object) -> bool:
    if not (isinstance(stamp, list) and len(stamp) == 3):
        return False
    try:
        stat = os.stat(source)
        if stat.st_size != stamp[0]:
            return False
        if stat.st_mtime_ns == stamp[1]:
            return True
        with open(source, "rb") as file:
            return bool(hashlib.sha256(file.read()).hexdigest() == stamp[2])
    except OSError:
        return False


def check(root: Path = ROOT) -> str:
    """What runs: "compiled" or "interpreted (<why>)"; raises StaleBuild when an
    extension on disk must not run (its source changed, or the build is partial).
    Plain os calls: this runs at every start, before anything else (~0.1 ms)."""
    bases = {m: os.path.join(root, *m.split(".")) for m in MODULES}
    built = [m for m, base in bases.items() if os.path.exists(base + EXTENSION_SUFFIX)]
    if not built:
        return "interpreted (not compiled at install: no C compiler or mypyc)"
    if len(built) < len(MODULES):
        missing = ", ".join(m for m in MODULES if m not in built)
        raise StaleBuild(f"the compiled core is partial ({missing} not built): {REBUILD}")
    try:
        with open(os.path.join(root, "kom_gateway", RECORD), "rb") as file:
            sources = json.load(file)["sources"]
        if not isinstance(sources, dict):
            raise TypeError("no sources")
    except FileNotFoundError:
        return "compiled"  # installed, not built in place
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise StaleBuild(f"the compiled core's {RECORD} is unreadable ({exc}): {REBUILD}") from exc
    changed = [m for m, base in bases.items() if not _unchanged(base + ".py", sources.get(m))]
    if changed:
        raise StaleBuild(
            f"{', '.join(changed)} changed after the compiled core was built, which must "
            f"not run in its place: {REBUILD} (about a minute), or "
            "`git clean -fX kom_gateway && KOM_GATEWAY_NO_EXTENSIONS=1 pip install -e .` "
            "makes the checkout interpreted"
        )
    return "compiled"


@cache
def core() -> str:
    """check(), once per process (kom_gateway/__init__.py: before any of MODULES loads)."""
    return check()


def is_compiled() -> bool:
    return core() == "compiled"


def start_warning() -> str | None:
    """The line to log at start when the core runs interpreted."""
    if is_compiled():
        return None
    return (
        f"the request path runs {core()}: ~1.6x the instructions per proxied request. "
        "Reinstall with a C compiler present (pip install .) to compile it."
    )
