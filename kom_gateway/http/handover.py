"""Handing a port over to a replacement (SO_REUSEPORT restart in place).

An instance told to stop keeps accepting until another process listens on its port, so
that a replacement started with the same command gets every new connection from its
first moment and no client meets a closed port in between. Which sockets listen comes
from the kernel's socket tables (Linux `/proc/net/tcp{,6}`); without them, nobody is
waited for.
"""

from __future__ import annotations

from pathlib import Path

LISTEN = "0A"  # TCP_LISTEN in /proc/net/tcp's `st` column
TABLES = (Path("/proc/net/tcp"), Path("/proc/net/tcp6"))


def listeners_on(port: int, table: str) -> int:
    """How many listening sockets of one /proc/net/tcp-format table use `port`."""
    count = 0
    for line in table.splitlines()[1:]:
        fields = line.split()
        if len(fields) > 3 and fields[3] == LISTEN:
            local = fields[1]
            if int(local.rsplit(":", 1)[1], 16) == port:
                count += 1
    return count


def others_listening(port: int, own: int = 1) -> bool:
    """Whether a socket other than our `own` ones listens on `port` (True when the
    kernel's tables cannot be read: then there is nothing to wait for)."""
    total = 0
    readable = False
    for path in TABLES:
        try:
            total += listeners_on(port, path.read_text())
            readable = True
        except OSError:
            continue
    return total > own or not readable
