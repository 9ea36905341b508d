"""Authentication as kube-apiserver does it, for the simulated groups (notes §7).

The chain is kube-apiserver's: request-header (front proxy), x509 client certificate,
bearer token file; the first that succeeds wins; if none does and any of them failed,
401 (a bad token is never taken for anonymous); otherwise anonymous. The TLS handshake
has already verified the certificate against the union of both CAs; which CA issued it
decides which authenticator accepts it, as two separate verifications would.

Written independently of the gateway's own identity code on purpose: this is the
equipment that checks it.
"""

from __future__ import annotations

import csv
import hashlib
import io
import ssl
from dataclasses import dataclass, field
from urllib.parse import unquote

from kom_gateway.server.tlsfiles import server_ssl_context

ANONYMOUS = "system:anonymous"
UNAUTHENTICATED = "system:unauthenticated"
AUTHENTICATED = "system:authenticated"


@dataclass(frozen=True)
class UserInfo:
    username: str
    groups: tuple[str, ...] = ()
    extra: dict[str, list[str]] = field(default_factory=dict)
    uid: str = ""
    authenticator: str = ""  # "requestheader", "x509", "token" or "anonymous"

    def as_json(self) -> dict:
        out: dict = {"username": self.username, "groups": list(self.groups)}
        if self.uid:
            out["uid"] = self.uid
        if self.extra:
            out["extra"] = self.extra
        return out


class Unauthorized(Exception):
    """Every authenticator that had something to check refused it: 401."""


def _name_key(name: tuple) -> tuple:
    return tuple(tuple(rdn) for rdn in name)


def ca_subject(ca_file: str) -> tuple:
    """The subject of the (first) certificate in a CA bundle, to match issuers against."""
    decoded = ssl._ssl._test_decode_cert(ca_file)  # type: ignore[attr-defined]
    return _name_key(decoded["subject"])


def load_token_file(path: str) -> dict[str, UserInfo]:
    """kube-apiserver's --token-auth-file CSV: token,user,uid[,"group1,group2"]."""
    with open(path, encoding="utf-8") as f:
        return parse_token_csv(f.read())


def parse_token_csv(text: str) -> dict[str, UserInfo]:
    tokens: dict[str, UserInfo] = {}
    for row in csv.reader(io.StringIO(text)):
        if len(row) < 3 or row[0].startswith("#"):
            continue
        groups = tuple(g.strip() for g in row[3].split(",") if g.strip()) if len(row) > 3 else ()
        tokens[row[0]] = UserInfo(row[1], groups, uid=row[2], authenticator="token")
    return tokens


class Authenticator:
    def __init__(
        self,
        client_ca_subject: tuple | None = None,
        requestheader_ca_subject: tuple | None = None,
        requestheader_allowed_names: tuple[str, ...] = (),
        tokens: dict[str, UserInfo] | None = None,
    ) -> None:
        self.client_ca_subject = client_ca_subject
        self.requestheader_ca_subject = requestheader_ca_subject
        self.allowed_names = requestheader_allowed_names
        self.tokens = tokens or {}

    def authenticate(
        self, cert: dict | None, der: bytes | None, headers: list[tuple[str, str]]
    ) -> UserInfo:
        errors: list[str] = []
        for step in (self._request_header, self._x509, self._token):
            try:
                user = step(cert, der, headers)
            except Unauthorized as exc:
                errors.append(str(exc))
                continue
            if user is not None:
                # kube-apiserver's AuthenticatedGroupAdder: not for anonymous
                if (
                    user.username != ANONYMOUS
                    and AUTHENTICATED not in user.groups
                    and UNAUTHENTICATED not in user.groups
                ):
                    user = UserInfo(
                        user.username,
                        (*user.groups, AUTHENTICATED),
                        user.extra,
                        user.uid,
                        user.authenticator,
                    )
                return user
        if errors:
            raise Unauthorized("; ".join(errors))
        return UserInfo(ANONYMOUS, (UNAUTHENTICATED,), authenticator="anonymous")

    def _issued_by(self, cert: dict, subject: tuple | None) -> bool:
        return subject is not None and _name_key(cert.get("issuer", ())) == subject

    def _request_header(
        self, cert: dict | None, der: bytes | None, headers: list[tuple[str, str]]
    ) -> UserInfo | None:
        if not cert or self.requestheader_ca_subject is None:
            return None
        if not self._issued_by(cert, self.requestheader_ca_subject):
            raise Unauthorized("request header: certificate not signed by the front-proxy CA")
        common_name = _common_name(cert)
        if self.allowed_names and common_name not in self.allowed_names:
            raise Unauthorized(f"request header: {common_name!r} is not an allowed name")
        users = [v for n, v in headers if n == "x-remote-user"]
        if not users or not users[0]:
            return None
        groups = tuple(v for n, v in headers if n == "x-remote-group")
        extra: dict[str, list[str]] = {}
        for name, value in headers:
            if name.startswith("x-remote-extra-"):
                key = unquote(name[len("x-remote-extra-") :]).lower()
                extra.setdefault(key, []).append(value)
        return UserInfo(users[0], groups, extra, authenticator="requestheader")

    def _x509(
        self, cert: dict | None, der: bytes | None, headers: list[tuple[str, str]]
    ) -> UserInfo | None:
        if not cert or self.client_ca_subject is None:
            return None
        if not self._issued_by(cert, self.client_ca_subject):
            raise Unauthorized("x509: certificate signed by unknown authority")
        common_name = _common_name(cert)
        if not common_name:
            return None
        organizations = tuple(
            value
            for rdn in cert.get("subject", ())
            for attr, value in rdn
            if attr == "organizationName"
        )
        fingerprint = hashlib.sha256(der or b"").hexdigest()
        return UserInfo(
            common_name,
            organizations,
            {"authentication.kubernetes.io/credential-id": [f"X509SHA256={fingerprint}"]},
            authenticator="x509",
        )

    def _token(
        self, cert: dict | None, der: bytes | None, headers: list[tuple[str, str]]
    ) -> UserInfo | None:
        for name, value in headers:
            if name == "authorization":
                scheme, _, token = value.partition(" ")
                if scheme.lower() != "bearer" or not token.strip():
                    return None
                user = self.tokens.get(token.strip())
                if user is None:
                    raise Unauthorized("invalid bearer token")
                return user
        return None


def _common_name(cert: dict) -> str:
    name = ""
    for rdn in cert.get("subject", ()):
        for attr, value in rdn:
            if attr == "commonName":
                name = value
    return name


@dataclass(frozen=True)
class SimSecurity:
    """kube-apiserver's serving and authentication flags, for `kom-gateway sim`."""

    tls_cert_file: str | None = None
    tls_private_key_file: str | None = None
    client_ca_file: str | None = None
    requestheader_client_ca_file: str | None = None
    requestheader_allowed_names: tuple[str, ...] = ()
    token_auth_file: str | None = None

    def ssl_context(self) -> ssl.SSLContext | None:
        """Serving TLS; client certificates of either CA are accepted (verified) and
        sorted out by the authenticators."""
        if not self.tls_cert_file or not self.tls_private_key_file:
            return None
        context = server_ssl_context(  # one ticket, as Go's crypto/tls sends
            self.tls_cert_file, self.tls_private_key_file, self.client_ca_file, session_tickets=1
        )
        if self.requestheader_client_ca_file:
            context.load_verify_locations(self.requestheader_client_ca_file)
            context.verify_mode = ssl.CERT_OPTIONAL
        return context

    def authenticator(self) -> Authenticator | None:
        if not (self.client_ca_file or self.requestheader_client_ca_file or self.token_auth_file):
            return None
        return Authenticator(
            ca_subject(self.client_ca_file) if self.client_ca_file else None,
            ca_subject(self.requestheader_client_ca_file)
            if self.requestheader_client_ca_file
            else None,
            self.requestheader_allowed_names,
            load_token_file(self.token_auth_file) if self.token_auth_file else None,
        )
