"""CPU of one server-side TLS handshake, for the serving contexts the gateway can build.

A reconnect storm is thousands of handshakes with client certificates at once; this
isolates their cost from everything else: client and server run in one process over
`ssl.MemoryBIO` pairs, and only the server's `do_handshake` calls are timed. The test
PKI (ECDSA P-256, a kubelet's client certificate) is made with openssl in a temporary
directory.

    python bench/handshake_bench.py [--handshakes 400]
"""

from __future__ import annotations

import argparse
import asyncio
import ssl
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))
from pki import PKI, make_pki  # noqa: E402  (a kubeadm-shaped PKI, made with openssl)

from kom_gateway.http.listener import Listener  # noqa: E402
from kom_gateway.server.tlsfiles import ServerTLSContext, server_ssl_context  # noqa: E402


def server_seconds(server_context: ssl.SSLContext, client_context: ssl.SSLContext) -> float:
    """One handshake in memory; the seconds spent in the server's calls."""
    s_in, s_out, c_in, c_out = (ssl.MemoryBIO() for _ in range(4))
    spent = 0.0
    began = time.perf_counter()
    server = server_context.wrap_bio(s_in, s_out, server_side=True)
    spent += time.perf_counter() - began
    client = client_context.wrap_bio(c_in, c_out, server_hostname="localhost")
    server_done = client_done = False
    while not (server_done and client_done):
        if not client_done:
            try:
                client.do_handshake()
                client_done = True
            except ssl.SSLWantReadError:
                pass
        s_in.write(c_out.read())
        if not server_done:
            began = time.perf_counter()
            try:
                server.do_handshake()
                server_done = True
            except ssl.SSLWantReadError:
                pass
            spent += time.perf_counter() - began
        c_in.write(s_out.read())
    return spent


_KEEP: list[ServerTLSContext] = []  # its SNI callback holds it weakly


_KEEP_LISTENERS: list[Listener] = []


async def _no_requests(*_args: object) -> None:
    raise AssertionError("no request reaches this listener")


async def _listener(context: ssl.SSLContext) -> Listener:
    """A listener (never started) on `context`: the TLS objects made from it now count
    their handshakes, as the gateway's do."""
    return Listener(_no_requests, ssl_context=context)


def contexts(pki: PKI) -> dict[str, ssl.SSLContext]:
    cert, key, ca = str(pki.server_cert), str(pki.server_key), str(pki.ca)
    stateful = server_ssl_context(cert, key, ca, 2)
    stateful.options |= ssl.OP_NO_TICKET
    served = [ServerTLSContext(cert, key, ca, tickets) for tickets in (2, 0, 0)]
    _KEEP.extend(served)
    _KEEP_LISTENERS.append(asyncio.run(_listener(served[2].listening)))
    return {
        "client CA, OpenSSL's default 2 tickets": server_ssl_context(cert, key, ca, 2),
        "the same, with rotation's SNI callback": served[0].listening,
        "client CA, no tickets": server_ssl_context(cert, key, ca),
        "client CA, no tickets, SNI callback (served)": served[1].listening,
        "the same, with the listener's handshake accounting": served[2].listening,
        "client CA, stateful tickets (OP_NO_TICKET)": stateful,
        "no client CA, 2 tickets": server_ssl_context(cert, key, None, 2),
        "no client CA, no tickets": server_ssl_context(cert, key, None),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--handshakes", type=int, default=400)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="kom-handshake-") as tmp:
        pki = make_pki(Path(tmp))
        client = ssl.create_default_context(cafile=str(pki.ca))
        client.load_cert_chain(str(pki.file("kubelet.crt")), str(pki.file("kubelet.key")))
        client.set_alpn_protocols(["h2"])
        print(f"{ssl.OPENSSL_VERSION}; server CPU per handshake, median of {args.handshakes}")
        for name, server in contexts(pki).items():
            for _ in range(50):  # warm-up
                server_seconds(server, client)
            times = [server_seconds(server, client) for _ in range(args.handshakes)]
            print(f"  {name:52} {statistics.median(times) * 1e6:7.1f} µs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
