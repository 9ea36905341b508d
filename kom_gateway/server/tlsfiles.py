"""TLS contexts built from files, rebuilt when the files change (certificate rotation).

cert-manager, kubeadm and Kubernetes Secret volumes replace certificate files in place
(Secret volumes by swapping a symlink), so the gateway compares the files' contents,
not their timestamps. A change that does not load (a key written before its cert, a
half-written file) is refused and the last good context keeps serving; the next check
tries again.

The server side uses one listening context whose SNI callback hands each new handshake
the newest context: certificate, key and client CA all rotate without a restart, and
established connections keep what they negotiated.
"""

from __future__ import annotations

import logging
import ssl
import weakref
from collections.abc import Callable
from typing import Generic, TypeVar

from kom_gateway.config.model import DEFAULT_SESSION_TICKETS
from kom_gateway.server.filewatch import FileSet

log = logging.getLogger(__name__)
T = TypeVar("T")


class ReloadingContext(Generic[T]):
    """A TLS context (or several made from the same files) rebuilt by `build` whenever
    its files change; see `refresh`."""

    def __init__(self, name: str, paths: tuple[str, ...], build: Callable[[], T]) -> None:
        self.name = name
        self._build = build
        self._files = FileSet(paths)
        self.current = build()  # errors here are the caller's (startup, config reload)
        self.generation = 1

    def refresh(self) -> bool | None:
        """Rebuild if the files changed: True if rotated, False if the new files were
        refused (the old context stays), None if nothing changed."""
        if not self._files.changed():
            return None
        try:
            context = self._build()
        except (OSError, ssl.SSLError, ValueError) as exc:
            log.error(
                "%s: new TLS files refused, still serving the previous ones: %s", self.name, exc
            )
            return False
        self.current = context
        self.generation += 1
        log.info("%s: TLS files reloaded (generation %d)", self.name, self.generation)
        return True


class ServerTLSContext(ReloadingContext[ssl.SSLContext]):
    """Serving TLS: `listening` is given to the server once; each handshake switches to
    the newest context in its SNI callback (which OpenSSL runs for every ClientHello,
    with or without SNI)."""

    def __init__(
        self,
        cert_file: str,
        key_file: str,
        client_ca_file: str | None,
        session_tickets: int = DEFAULT_SESSION_TICKETS,
    ) -> None:
        super().__init__(
            "listen.tls",
            (cert_file, key_file, client_ca_file or ""),
            lambda: server_ssl_context(cert_file, key_file, client_ca_file, session_tickets),
        )
        self.listening = self.current
        self.listening.sni_callback = _newest_context(weakref.ref(self))


def _newest_context(owner: Callable[[], ServerTLSContext | None]) -> Callable[..., None]:
    """The SNI callback. It reaches its ServerTLSContext through a weak reference: the
    listening context holds the callback, so a strong one would make a cycle that only
    the cyclic collector frees."""

    def select(ssl_object: ssl.SSLObject, server_name: str | None, context: object) -> None:
        tls = owner()
        if tls is not None and ssl_object.context is not tls.current:
            ssl_object.context = tls.current
        return None

    return select


def server_ssl_context(
    cert_file: str,
    key_file: str,
    client_ca_file: str | None,
    session_tickets: int = DEFAULT_SESSION_TICKETS,
) -> ssl.SSLContext:
    """TLS 1.2+, ALPN h2 then http/1.1; with a client CA, certificates are requested and
    verified (a certificate from another CA fails the handshake), but not required:
    token and anonymous clients still connect.

    `session_tickets`: TLS 1.3 session tickets sent after each full handshake (OpenSSL
    sends 2). client-go, kubectl and the Python client never resume a session, so by
    default none are sent: a ticket holds the client's certificate, and writing two cost
    the server about a quarter of a handshake with a client certificate
    (bench/handshake_bench.py)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.num_tickets = session_tickets
    context.load_cert_chain(cert_file, key_file)
    context.set_alpn_protocols(["h2", "http/1.1"])
    if client_ca_file:
        context.load_verify_locations(client_ca_file)
        context.verify_mode = ssl.CERT_OPTIONAL
    return context
