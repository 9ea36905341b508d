"""Is an HTTP/2 request malformed (RFC 9113 8.2, 8.3)? Pure; for the `h2` engine.

A malformed request is a stream error (RFC 9113 8.1.1): the stream is reset with
PROTOCOL_ERROR and the connection lives on, as nghttp2 and Go's server do. h2 would judge
the same headers as a connection error, so the h2 engine turns its own checks off and
asks this module, per stream. A `:path` that is not an absolute path (no leading `/`) is
malformed, as nghttp2 and Go's server judge it. What is well-formed but meaningless to a
Kubernetes API (CONNECT) is not malformed: the gateway answers it 400.
"""

from __future__ import annotations

import re

from kom_gateway.http.stream import Headers

_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9a-z]+\Z")  # lower-case tchar (RFC 9110 5.6.2)
_BAD_VALUE = re.compile(rb"[\x00\r\n]|\A[ \t]|[ \t]\Z")
_PSEUDO = frozenset((b":method", b":scheme", b":authority", b":path"))
_CONNECTION_SPECIFIC = frozenset(
    (b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade")
)


def header_list_size(headers: Headers) -> int:
    """The size SETTINGS_MAX_HEADER_LIST_SIZE limits (RFC 9113 6.5.2)."""
    return sum(len(name) + len(value) + 32 for name, value in headers)


def malformed_request(headers: Headers) -> str | None:
    """Why the request's header list is malformed, or None."""
    seen: set[bytes] = set()
    regular = False
    for name, value in headers:
        if name[:1] == b":":
            if regular:
                return f"pseudo-header {name!r} after a regular header"
            if name not in _PSEUDO:
                return f"unknown pseudo-header {name!r}"
            if name in seen:
                return f"repeated pseudo-header {name!r}"
            seen.add(name)
        else:
            regular = True
            if not _TOKEN.match(name):
                return f"invalid header name {name[:64]!r}"
            if name in _CONNECTION_SPECIFIC or (name == b"te" and value != b"trailers"):
                return f"connection-specific header {name!r}"
        if _BAD_VALUE.search(value):
            return f"invalid value for {name[:64]!r}"
    if b":method" not in seen:
        return "no :method"
    method = next(v for n, v in headers if n == b":method")
    if method != b"CONNECT":
        if not {b":scheme", b":path"} <= seen:
            return "no :scheme or :path"
        path = next(v for n, v in headers if n == b":path")
        # an absolute path (RFC 9113 8.3.1), or "*" for OPTIONS: as nghttp2 and Go judge it
        if path[:1] != b"/" and not (method == b"OPTIONS" and path == b"*"):
            return "a :path that is not an absolute path"
    return None
