"""Header rewriting between client and apiserver, and the headers of Status answers (pure)."""

from __future__ import annotations

from collections.abc import Sequence

from kom_gateway.http.stream import Headers

# RFC 9110 §7.6.1 connection-specific headers; HTTP/2 forbids them outright.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"transfer-encoding",
        b"te",
        b"upgrade",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"trailer",
        b"host",
        b"http2-settings",
    }
)
IDENTITY_PREFIX = b"x-remote-"  # front-proxy identity: only the gateway may set these
# header name -> dropped on the way up (hop-by-hop or identity): ~1,300 instructions a
# header to work out, one dict lookup to remember; bounded, as names are the client's
_DROPPED: dict[bytes, bool] = {}
DROPPED_CACHE_SIZE = 1024
# (method, scheme, authority) -> their pseudo-header fields, encoded once
_PSEUDO_FIELDS: dict[tuple[str, str, str], tuple[tuple[bytes, bytes], ...]] = {}


def is_identity_header(name: bytes) -> bool:
    """A front-proxy identity header, in any spelling a proxy or server between here and
    the apiserver might normalize to one (`X_Remote_User` -> `X-Remote-User`)."""
    if name.startswith(IDENTITY_PREFIX):
        return True
    # name.find, not `b"_" in name`: bytes.__contains__ first tries its argument as an
    # int and formats a TypeError it then discards (~2k instructions per header)
    return name.find(b"_") != -1 and name.replace(b"_", b"-").startswith(IDENTITY_PREFIX)


def dropped_upstream(name: bytes) -> bool:
    """Whether a client's header `name` never reaches the apiserver (memoised)."""
    dropped = _DROPPED.get(name)
    if dropped is None:
        dropped = name in HOP_BY_HOP or is_identity_header(name)
        if len(_DROPPED) >= DROPPED_CACHE_SIZE:
            _DROPPED.clear()
        _DROPPED[name] = dropped
    return dropped


def upstream_request_headers(
    method: str,
    scheme: str,
    authority: str,
    target: str,
    headers: Headers,
    identity: Sequence[tuple[bytes, bytes]] = (),
) -> Headers:
    """Client request headers as the apiserver must see them.

    Hop-by-hop headers (and any the client listed in Connection) are dropped, and so is
    every incoming X-Remote-* header (also spelled with underscores), always: otherwise
    anyone could claim any identity to an apiserver that trusts the gateway's front-proxy
    certificate. Then `identity`,
    the front-proxy headers of a verified client certificate, is added.
    """
    key = (method, scheme, authority)
    prefix = _PSEUDO_FIELDS.get(key)
    if prefix is None:
        if len(_PSEUDO_FIELDS) >= 256:  # methods are the client's to choose
            _PSEUDO_FIELDS.clear()
        prefix = _PSEUDO_FIELDS[key] = (
            (b":method", method.encode("latin-1")),
            (b":scheme", scheme.encode("latin-1")),
            (b":authority", authority.encode("latin-1")),
        )
    out: Headers = [*prefix, (b":path", target.encode("latin-1"))]
    listed = False
    for field in headers:
        name = field[0]
        if dropped_upstream(name):
            listed = listed or name == b"connection"
            continue
        out.append(field)
    if listed:  # HTTP/1.1 only (HTTP/2 has no Connection): drop what it names, too
        named = {v.strip().lower() for n, v in headers if n == b"connection" for v in v.split(b",")}
        out = out[:4] + [(n, v) for n, v in out[4:] if n not in named]
    out.extend(identity)
    return out


def downstream_response_headers(headers: Headers) -> Headers:
    return [field for field in headers if field[0] not in HOP_BY_HOP]


def answered_by(name: str, group: str, fallback: str | None) -> Headers:
    """The opt-in `debug.answeredByHeader` (`name`; "" when it is off): which group
    answered ("gateway": the gateway itself), and why the request left its chosen group,
    if it did."""
    if not name:
        return []
    value = f"{group}; fallback={fallback}" if fallback else group
    return [(name.encode("latin-1"), value.encode("latin-1"))]


def status_headers(body: bytes, retry_after: int | None = None) -> Headers:
    out: Headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"cache-control", b"no-cache, private"),
    ]
    if retry_after is not None:
        out.append((b"retry-after", str(retry_after).encode()))
    return out
