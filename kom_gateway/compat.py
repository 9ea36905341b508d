"""Every place the gateway reaches into a third-party library's internals, in one module,
and the versions those reach-ins were tested with.

Each reach-in is here for a measured reason (said beside it); each could break on a new
release of its library. So the versions are bounded (`BOUNDS`, the same strings as
pyproject.toml's dependencies: tests/test_compat.py keeps the two equal and fails when an
installed version is outside them), and `missing()` lists any internal that is gone, so
a new release fails one clear test instead of a request at run time. To widen a bound:
install the new version, run the suite, raise the bound in both places.
"""

from __future__ import annotations

import functools
import ssl
from collections.abc import Callable
from typing import Any

import h2.config
import h2.connection
import hpack.hpack
import hpack.huffman
import hpack.huffman_constants
import hpack.table
from aiohttp import web
from aiohttp.web_protocol import RequestHandler

# distribution -> the requirement pyproject.toml states: the suite passed at both ends
# (2026-12-06: h2 4.1.0 and 4.4.1, hpack 4.0.0 and 4.2.0, prometheus-client 0.20.0 and
# 0.26.0; aiohttp 3.14.5 only: 3.11 parses malformed HTTP/1.1 differently, and the test
# tools need >= 3.11)
BOUNDS: dict[str, str] = {
    "h2": ">=4.1,<4.5",
    "hpack": ">=4.0,<4.3",
    "aiohttp": ">=3.14,<3.15",
    "prometheus-client": ">=0.20,<0.27",
}


# -- hpack ---------------------------------------------------------------------------------
# the pieces of hpack's encoder that `hpack_encoder.StatelessEncoder` reuses (integer
# coding, Huffman tables, the static table); not in hpack's documented API
encode_integer = hpack.hpack.encode_integer
HuffmanEncoder = hpack.huffman.HuffmanEncoder
REQUEST_CODES = hpack.huffman_constants.REQUEST_CODES
REQUEST_CODES_LENGTH = hpack.huffman_constants.REQUEST_CODES_LENGTH
STATIC_TABLE = hpack.table.HeaderTable.STATIC_TABLE


def memoize_huffman_decoding(max_bytes: int) -> None:
    """hpack decodes Huffman literals in pure Python, per character. Go and nginx send
    response headers as Huffman literals *without* indexing, so the same few strings
    (content-type, a Date that changes once a second, ...) are decoded on every request.
    The decoder is a pure function of its bytes (hpack slices bytes, never views), so an
    LRU memo of strings up to `max_bytes` is exact. Measured: a quarter of the proxy's
    CPU before, near zero after. (The h2 engine's; idempotent.)"""
    if hasattr(hpack.hpack.decode_huffman, "memoized"):
        return
    decode = hpack.hpack.decode_huffman
    cached = functools.lru_cache(maxsize=4096)(decode)

    def decode_huffman(data: bytes) -> bytes:
        # only short strings repeat; a long one would pin its bytes in the memo
        return cached(data) if len(data) <= max_bytes else decode(data)

    decode_huffman.memoized = True  # type: ignore[attr-defined]
    hpack.hpack.decode_huffman = decode_huffman


def silence_hpack_debug_logging() -> None:
    """hpack calls `log.debug` for every header and integer it codes (64 calls for a
    small proxied request, ~4% of the CPU even with debug logging off). Its debug output
    is of no use to an operator; a no-op logger removes the calls' cost."""

    class _Silent:
        def debug(self, *args: object, **kwargs: object) -> None:
            pass

    hpack.hpack.log = _Silent()  # type: ignore[assignment]


# -- ssl (the standard library) ---------------------------------------------------------
def _ssl_keeps_c_object() -> object:
    """The C object of an `ssl.SSLObject` (`_sslobj`, since Python 3.5), if it has the
    methods `LoopTLSObject` hands out; None if this Python keeps it elsewhere."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    probe = context.wrap_bio(ssl.MemoryBIO(), ssl.MemoryBIO(), server_hostname="probe")
    inner = vars(probe).get("_sslobj")
    names = ("read", "write", "pending")
    return inner if all(callable(getattr(inner, name, None)) for name in names) else None


class _CMethods(ssl.SSLObject):
    @property  # type: ignore[override]
    def read(self) -> Callable[..., Any]:
        return self._sslobj.read  # type: ignore[attr-defined,no-any-return]

    @property  # type: ignore[override]
    def write(self) -> Callable[[bytes], int]:
        return self._sslobj.write  # type: ignore[attr-defined,no-any-return]

    @property  # type: ignore[override]
    def pending(self) -> Callable[[], int]:
        return self._sslobj.pending  # type: ignore[attr-defined,no-any-return]


SSL_C_METHODS = _ssl_keeps_c_object() is not None


class LoopTLSObject(_CMethods if SSL_C_METHODS else ssl.SSLObject):  # type: ignore[misc]
    """The TLS object the event loop makes per connection (a context serves it as
    `SSLContext.sslobject_class`). `ssl.SSLObject`'s `read`, `write` and `pending` are
    Python methods that only call the same-named methods of the C object underneath;
    the loop's TLS protocol calls them several times for every record it moves (uvloop
    looks each up once per connection and keeps it), ~13 interpreted calls a request
    at the cluster shape, both sides of the proxy. This one hands the loop the C
    methods themselves: same arguments, results and errors (bench/README.md, "The
    interpreter's last calls per request"). On a Python that keeps its C object
    elsewhere the methods stay the stock ones (and `missing()` says so)."""


# -- prometheus-client ---------------------------------------------------------------------
def histogram_upper_bounds(child: Any) -> list[float]:
    """A histogram child's bucket bounds (+Inf last), to find buckets in batches."""
    return list(child._upper_bounds)


def histogram_add(child: Any, counts: list[float]) -> None:
    """Add a batch to a histogram child: `counts` is [sum, count per bucket], as
    `observe()` would have added them one by one (no public batch API)."""
    child._sum.inc(counts[0])
    for bucket, count in zip(child._buckets, counts[1:], strict=True):
        if count:
            bucket.inc(count)


# -- h2 --------------------------------------------------------------------------------------
class H2ConnectionHooks(h2.connection.H2Connection):
    """h2's connection with the two internals the gateway needs under public names:
    queueing a frame of our own, and taking over what a received GOAWAY does (stock h2
    closes the state machine, after which the streams the peer promised to finish could
    not be read)."""

    def queue_frame(self, data: bytes) -> None:
        self._data_to_send += data

    def on_goaway_frame(self, frame: Any) -> list[Any]:
        """The events a received GOAWAY frame makes (the default: h2's own)."""
        return list(super()._receive_goaway_frame(frame)[1])

    def _receive_goaway_frame(self, frame: Any) -> tuple[list[Any], list[Any]]:
        return [], self.on_goaway_frame(frame)


def h2_unreturned_bytes(conn: h2.connection.H2Connection) -> int:
    """DATA received and not yet credited back; h2 counts credited bytes as processed
    until it sends their WINDOW_UPDATE, and keeps the count private."""
    window = conn._inbound_flow_control_window_manager
    return int(window.max_window_size - window.current_window_size - window._bytes_processed)


# -- aiohttp ---------------------------------------------------------------------------------
def requests_seen(handler: RequestHandler) -> int:
    """Requests whose headers have arrived on an HTTP/1.1 connection (aiohttp counts
    them for its keep-alive logic; the drain and the header deadline need the count)."""
    return int(handler._request_count)


async def drain_writes(handler: RequestHandler) -> None:
    """Wait until the connection's transport takes writes again (after a raw
    `transport.write` in a protocol switch, as aiohttp's own WebSocket writer waits)."""
    await handler._drain_helper()


def new_request_handler(server: web.Server, cls: type[RequestHandler]) -> RequestHandler:
    """A connection handler of class `cls` made as `web.Server.__call__` makes its own."""
    return cls(server, loop=server._loop, **server._kwargs)


def server_loop_time(server: web.Server) -> float:
    return float(server._loop.time())


def server_connections(server: web.Server) -> list[RequestHandler]:
    return list(server._connections)


def site_sockets(site: web.BaseSite) -> list[Any]:
    """The listening sockets of a started aiohttp site (aiohttp keeps its asyncio
    server private): the admin port's, to hand to a replacement; a port-0 site's port."""
    server = site._server
    return list(server.sockets) if server is not None and server.sockets else []


def missing() -> list[str]:
    """The internals above that the installed libraries no longer have (`web.Server`'s
    `_loop`, `_kwargs` and `_connections` are set per instance: the HTTP/1.1 tests use
    them on every run)."""
    checks: dict[str, Callable[[], object]] = {
        "hpack.hpack.decode_huffman": lambda: hpack.hpack.decode_huffman,
        "hpack.hpack.log": lambda: hpack.hpack.log.debug,
        "h2 H2Connection._receive_goaway_frame": lambda: (
            h2.connection.H2Connection._receive_goaway_frame
        ),
        "h2 H2Connection._data_to_send": lambda: (
            h2.connection.H2Connection(h2.config.H2Configuration())._data_to_send
        ),
        "h2 WindowManager._bytes_processed": lambda: (
            h2.connection.H2Connection(
                h2.config.H2Configuration()
            )._inbound_flow_control_window_manager._bytes_processed
        ),
        "aiohttp RequestHandler._request_count": lambda: RequestHandler.__slots__.index(
            "_request_count"
        ),
        "aiohttp RequestHandler._drain_helper": lambda: RequestHandler._drain_helper,
        "aiohttp BaseSite._server": lambda: "_server" in web.BaseSite.__slots__ or None,
        "prometheus-client histogram _upper_bounds/_sum/_buckets": _histogram_internals,
        "ssl SSLObject._sslobj": _ssl_keeps_c_object,
    }
    gone = []
    for name, check in checks.items():
        try:
            if check() is None:
                gone.append(name)
        except (AttributeError, ValueError):
            gone.append(name)
    return gone


def _histogram_internals() -> object:
    from prometheus_client import CollectorRegistry, Histogram

    child = Histogram("probe", "", registry=CollectorRegistry())
    return child._upper_bounds and child._sum and child._buckets
