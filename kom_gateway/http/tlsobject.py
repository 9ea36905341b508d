"""The TLS object the event loop makes for each of the gateway's connections.

An `ssl.SSLObject`'s `read`, `write` and `pending` are Python methods that only call
the same-named methods of the C object underneath. The loop's TLS protocol calls them
several times for every record it moves (uvloop looks each one up once per connection
and keeps it), so each call was an interpreted frame: about 13 per request at the
cluster shape, on both sides of the proxy. `LoopTLSObject` hands the loop the C
methods themselves, which behave the same (same arguments, results and errors).
A context serves it as `SSLContext.sslobject_class`. (Should a Python ever keep its C
object elsewhere, the probe below finds it and the methods stay the stock ones.)
"""

from __future__ import annotations

import ssl
from collections.abc import Callable
from typing import Any


def _keeps_c_object() -> bool:
    """Whether this Python's `SSLObject` keeps its C object as `_sslobj` (3.5 to now)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    probe = context.wrap_bio(ssl.MemoryBIO(), ssl.MemoryBIO(), server_hostname="probe")
    inner = vars(probe).get("_sslobj")
    return all(callable(getattr(inner, name, None)) for name in ("read", "write", "pending"))


class _DirectMethods(ssl.SSLObject):
    @property  # type: ignore[override]
    def read(self) -> Callable[..., Any]:
        return self._sslobj.read  # type: ignore[attr-defined,no-any-return]

    @property  # type: ignore[override]
    def write(self) -> Callable[[bytes], int]:
        return self._sslobj.write  # type: ignore[attr-defined,no-any-return]

    @property  # type: ignore[override]
    def pending(self) -> Callable[[], int]:
        return self._sslobj.pending  # type: ignore[attr-defined,no-any-return]


DIRECT = _keeps_c_object()


class LoopTLSObject(_DirectMethods if DIRECT else ssl.SSLObject):  # type: ignore[misc]
    """An `ssl.SSLObject` whose hot methods are its C object's own."""


def serve_direct(context: ssl.SSLContext) -> ssl.SSLContext:
    """`context`, its connections' TLS objects made as `LoopTLSObject`s."""
    context.sslobject_class = LoopTLSObject
    return context
