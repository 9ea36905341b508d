"""The HTTP/2 engine seam: which implementation carries HTTP/2 on both sides.

- `nghttp2`: libnghttp2 through the compiled extension (`_nghttp2.pyx`): the fast one.
- `h2`: the pure-Python h2 state machine: portable, always there.

`http2.engine: auto` (the default) takes nghttp2 when the extension imports, else h2 with
one warning naming what is missing. Both engines present the same classes to the rest of
the gateway: a server connection whose streams are `ServerStream`s, and an upstream
client connection (`HTTP2ClientConnection`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from kom_gateway.http.client import HTTP2ClientConnection
from kom_gateway.http.serverconn import HTTP2ServerConnection
from kom_gateway.http.settings import HTTP2_ENGINES

log = logging.getLogger(__name__)
CHOICES = HTTP2_ENGINES


@dataclass(frozen=True)
class Engine:
    name: str
    server: type[HTTP2ServerConnection]
    client: type[HTTP2ClientConnection]


def _h2() -> Engine:
    from kom_gateway.http.h2.client import H2ClientConnection
    from kom_gateway.http.h2.server import H2ServerProtocol

    return Engine("h2", H2ServerProtocol, H2ClientConnection)


def _nghttp2() -> Engine:
    from kom_gateway.http.nghttp2.client import NgClientConnection
    from kom_gateway.http.nghttp2.server import NgServerProtocol

    return Engine("nghttp2", NgServerProtocol, NgClientConnection)


def nghttp2_missing() -> str | None:
    """Why the nghttp2 engine cannot load here, or None when it can."""
    try:
        import kom_gateway.http.nghttp2._nghttp2  # noqa: F401
    except ImportError as exc:  # not built (no compiler, Cython or libnghttp2 at install)
        return str(exc)
    return None


_warned = False
# what `auto` means; tests run the protocol suite once with each engine through this
auto_preference = "nghttp2"


def select(choice: str = "auto") -> Engine:
    """The engine for `choice` (auto | nghttp2 | h2). An explicit nghttp2 that cannot
    load is an error; auto falls back to h2 and says why, once per process."""
    global _warned
    if choice not in CHOICES:
        raise ValueError(f"unknown HTTP/2 engine {choice!r} (choose one of {', '.join(CHOICES)})")
    if choice == "auto":
        choice = auto_preference
        if choice == "nghttp2":
            missing = nghttp2_missing()
            if missing is not None:
                if not _warned:
                    _warned = True
                    log.warning(
                        "HTTP/2 engine: nghttp2 extension unavailable (%s); using the slower "
                        "pure-Python h2. Reinstall with gcc, Cython and libnghttp2.so.14 present "
                        "to build it.",
                        missing,
                    )
                return _h2()
    if choice == "nghttp2":
        missing = nghttp2_missing()
        if missing is not None:
            raise ValueError(f"HTTP/2 engine nghttp2 is not available: {missing}")
        return _nghttp2()
    return _h2()
