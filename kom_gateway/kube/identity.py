"""Who the client is, from its verified TLS certificate, as front-proxy headers (pure).

kube-apiserver trusts `X-Remote-User`/`-Group`/`-Extra-*` only from a front-proxy client
certificate, so the gateway is the one place that turns a verified end-user certificate
into those headers: user = CN, one group per O, and the credential id kube-apiserver's
own x509 authenticator records (`X509SHA256=<hex of the DER>`). Incoming X-Remote-*
headers are never trusted (see `headers.upstream_request_headers`).
"""

from __future__ import annotations

import hashlib
import ssl
from typing import NamedTuple
from urllib.parse import quote

Headers = list[tuple[bytes, bytes]]  # as in kom_gateway.http.stream

CREDENTIAL_ID_KEY = "authentication.kubernetes.io/credential-id"


def x509_identity(common_name: str, organizations: tuple[str, ...]) -> str:
    """Client identity of a verified certificate: `x509:CN=<cn>,O=<o1>,O=<o2>`."""
    return "x509:" + ",".join([f"CN={common_name}", *(f"O={o}" for o in organizations)])


def parse_x509_identity(identity: str) -> tuple[str, tuple[str, ...]] | None:
    """(user, groups) of an `x509:` identity, as the apiserver derives them; else None."""
    if not identity.startswith("x509:"):
        return None
    user, groups = "", []
    for part in identity[5:].split(","):
        key, _, value = part.partition("=")
        if key == "CN":
            user = value
        elif key == "O":
            groups.append(value)
    return user, tuple(groups)


def token_identity(token: bytes) -> str:
    """The cut-over identity of a bearer token: a digest, never the token itself (it is
    printed in access logs and metrics labels)."""
    return "token:" + hashlib.sha256(token.strip()).hexdigest()[:32]


class PeerIdentity(NamedTuple):
    user: str
    groups: tuple[str, ...]
    credential_id: str  # "X509SHA256=<lower-case hex>"
    key: str  # the cut-over client key: "x509:CN=<user>,O=<group>,..."
    headers: Headers  # what the apiserver is told, computed once per connection


def peer_identity(cert: dict | None, der: bytes | None) -> PeerIdentity | None:
    """Identity of a verified client certificate (`SSLSocket.getpeercert()` and its DER).

    None without a certificate, and for one with an empty CN: kube-apiserver's x509
    authenticator does not authenticate those either, so such a request goes on with
    whatever other credentials it carries (a bearer token) or as anonymous.
    """
    if not cert or not der:
        return None
    common_name = ""
    organizations: list[str] = []
    for rdn in cert.get("subject", ()):
        for attr, value in rdn:
            if attr == "commonName":
                common_name = value  # Go's pkix.Name keeps the last CN
            elif attr == "organizationName":
                organizations.append(value)
    if not common_name:
        return None
    groups = tuple(organizations)
    credential_id = "X509SHA256=" + hashlib.sha256(der).hexdigest()
    return PeerIdentity(
        common_name,
        groups,
        credential_id,
        x509_identity(common_name, groups),
        identity_headers(common_name, groups, {CREDENTIAL_ID_KEY: [credential_id]}),
    )


def identity_headers(user: str, groups: tuple[str, ...], extra: dict[str, list[str]]) -> Headers:
    """Front-proxy request headers (notes §7): one X-Remote-Group line per group (commas
    are not split by the apiserver), extra keys %-escaped and lower-cased."""
    out: Headers = [(b"x-remote-user", _header_value(user))]
    out.extend((b"x-remote-group", _header_value(g)) for g in groups)
    for key, values in extra.items():
        name = b"x-remote-extra-" + quote(key, safe="-!#$&'*+.^_`|~").lower().encode("ascii")
        out.extend((name, _header_value(v)) for v in values)
    return out


def _header_value(text: str) -> bytes:
    """UTF-8 on the wire, as Go writes header values; control characters (which no
    certificate should carry) would split the header and are dropped."""
    return "".join(c for c in text if c >= " " and c != "\x7f").encode("utf-8")


def identity_of_ssl(ssl_object: ssl.SSLObject | ssl.SSLSocket | None) -> PeerIdentity | None:
    """The verified peer's identity on a TLS connection (None on plaintext)."""
    if ssl_object is None:
        return None
    return peer_identity(ssl_object.getpeercert(), ssl_object.getpeercert(binary_form=True))
