"""The compiled core: the request path's modules, compiled by mypyc at install, with
their Python source kept as the portable fallback (as aiohttp keeps its parser's).

mypyc turns these type-annotated modules into C extensions: native classes (attributes
at fixed offsets) and calls between them in C. A proxied request costs ~40% fewer
instructions (bench/README.md, "Fifth round"). They are compiled as one group whose
modules call each other natively, so it is all of them or none. The extensions sit
next to the sources and Python's importer prefers them; `activate()`, run once when the
package is imported, decides which run:

- the compiled group, when every module was built from the source now on disk (the
  build records each source's SHA-256 in `_compiled.json`);
- the sources, when KOM_GATEWAY_PURE_PYTHON=1, when nothing was built (no compiler, no
  mypyc), or when a source changed since the build (an editable checkout: a stale
  extension must never run in place of the code that was edited). A finder at the
  front of `sys.meta_path` then loads these modules from their .py files.
"""

from __future__ import annotations

import hashlib
import importlib.abc
import importlib.machinery
import importlib.util
import json
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType

# What a proxied request runs in Python. setup.py reads this list.
# (overload/policy.py is not here: mypyc mishandles its frozen dataclasses' defaults.)
MODULES = (
    "kom_gateway.kube.requestinfo",
    "kom_gateway.kube.identity",
    "kom_gateway.tokenbucket",
    "kom_gateway.config.holder",
    "kom_gateway.routing.claims",
    "kom_gateway.routing.glob",
    "kom_gateway.routing.cutover",
    "kom_gateway.routing.router",
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
    # engines, which stay interpreted (their bases allow interpreted subclasses)
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
MANIFEST = "_compiled.json"  # in the package: {"sources": {module: SHA-256 of its source}}
PURE_ENV = "KOM_GATEWAY_PURE_PYTHON"
ROOT = Path(__file__).resolve().parent.parent  # the directory holding the package


def source_path(module: str, root: Path = ROOT) -> Path:
    return root.joinpath(*module.split(".")).with_suffix(".py")


def source_digest(module: str, root: Path = ROOT) -> str:
    return hashlib.sha256(source_path(module, root).read_bytes()).hexdigest()


def build_record(root: Path = ROOT) -> dict[str, dict[str, str]]:
    """What the build writes to MANIFEST (setup.py loads this file to do so)."""
    return {"sources": {m: source_digest(m, root) for m in MODULES}}


def _extension_exists(module: str, root: Path) -> bool:
    source = source_path(module, root)
    return any(source.with_suffix(s).exists() for s in importlib.machinery.EXTENSION_SUFFIXES)


def pure_reason(environ: Mapping[str, str] = os.environ, root: Path = ROOT) -> str | None:
    """Why the sources must run instead of the compiled group; None: the group runs."""
    if environ.get(PURE_ENV) == "1":
        return f"{PURE_ENV}=1"
    missing = [m for m in MODULES if not _extension_exists(m, root)]
    if len(missing) == len(MODULES):
        return "not compiled at install (no C compiler or mypyc)"
    if missing:
        return f"incomplete build: {', '.join(missing)} not compiled"
    try:
        recorded = json.loads((root / "kom_gateway" / MANIFEST).read_text())["sources"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"no build record ({MANIFEST})"
    changed = [m for m in MODULES if recorded.get(m) != source_digest(m, root)]
    if changed:
        return f"stale build: {', '.join(changed)} changed since it was compiled; reinstall"
    try:
        importlib.import_module(f"{GROUP}__mypyc")
    except ImportError as exc:
        return f"the compiled group does not load: {exc}"
    return None


class _SourceFinder(importlib.abc.MetaPathFinder):
    """Finds the compiled modules' .py sources ahead of their extensions."""

    def find_spec(
        self, fullname: str, path: object = None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname not in MODULES:
            return None
        return importlib.util.spec_from_file_location(fullname, source_path(fullname))


_state: str | None = None


def activate() -> str:
    """Choose, once per process, before any of MODULES is imported; returns what runs:
    "compiled" or "pure Python (<why>)"."""
    global _state
    if _state is None:
        reason = pure_reason()
        if reason is None:
            _state = "compiled"
        else:
            sys.meta_path.insert(0, _SourceFinder())
            _state = f"pure Python ({reason})"
    return _state


def is_compiled() -> bool:
    return activate() == "compiled"


def start_warning() -> str | None:
    """The line to log at start when the core runs interpreted without being asked to."""
    state = activate()
    if state == "compiled" or PURE_ENV in state:
        return None
    return (
        f"the request path runs as {state}: ~1.6x the instructions per proxied request. "
        "Reinstall with a C compiler present (pip install .) to compile it."
    )
