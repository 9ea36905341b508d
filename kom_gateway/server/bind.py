"""A port that cannot be bound, said in one line: which address, why, what to change."""

from __future__ import annotations

import errno
import socket

BACKLOG = 4096  # connections the kernel queues on a serving socket while the gateway is
# busy (a reconnect storm): one process's listener and each worker's socket


class BindError(Exception):
    """A port could not be bound: one line that says which and what to change."""

    def __init__(self, what: str, host: str, port: int, exc: OSError, option: str) -> None:
        reason = exc.strerror or str(exc)
        advice = f"choose another address with {option}"
        if exc.errno == errno.EADDRINUSE:
            advice = (
                "another process holds it: stop it, " + advice + ", or start both "
                "instances with --reuse-port to replace one in place"
            )
        super().__init__(f"cannot listen on {host}:{port} ({what}): {reason}; {advice}")


def listening_socket(host: str, port: int, reuse_port: bool = True) -> socket.socket:
    """A serving socket, bound and listening (port 0: any). `reuse_port`: SO_REUSEPORT,
    as each worker of `--workers N` and an instance replaced in place need."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        sock.listen(BACKLOG)
    except OSError as exc:
        sock.close()
        raise BindError("serving", host, port, exc, "--listen / listen.address") from None
    return sock
