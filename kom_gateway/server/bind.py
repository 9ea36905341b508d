"""A port that cannot be bound, said in one line: which address, why, what to change."""

from __future__ import annotations

import errno

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
