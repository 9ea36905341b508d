"""Give memory freed after a burst back to the OS (glibc's `malloc_trim`).

A burst of connections (a reconnect storm, hostile clients cut off) leaves the heap
larger than what is in use afterwards: glibc keeps freed pages for reuse, so RSS stayed
~40% above its idle size (bench/hostile_bench.py burst-rss: 49 -> 70 MiB, 70 MiB ten
seconds later, 49 MiB after `malloc_trim(0)`). A replica's memory request and an HPA on
memory read RSS, so it is worth returning: at most once a minute, when RSS is 16 MiB or
more above the lowest it has been after a trim, the heap is trimmed. A trim costs a
walk of the heap (2-4 ms for 380 MiB, measured), so even when it frees nothing its
cost is ~0.01% of a core. Elsewhere than glibc it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

INTERVAL = 60.0  # seconds between trims at most
MIN_GROWTH = 16 << 20  # bytes above the floor before a trim is tried


def _malloc_trim() -> Callable[[int], int] | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim  # type: ignore[no-any-return]


def rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


class MemoryTrimmer:
    def __init__(
        self,
        trim: Callable[[int], int] | None = None,
        rss: Callable[[], int] = rss_bytes,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._trim = trim if trim is not None else _malloc_trim()
        self._rss = rss
        self._clock = clock
        self.floor = rss()  # the lowest RSS after a trim (or at start)
        self._last = clock()

    def maybe_trim(self) -> int:
        """Trim if it is due; the bytes RSS fell by (0 if no trim ran)."""
        now = self._clock()
        if self._trim is None or now - self._last < INTERVAL:
            return 0
        before = self._rss()
        if before - self.floor < MIN_GROWTH:
            return 0
        self._last = now
        self._trim(0)
        after = self._rss()
        self.floor = min(self.floor, after) if self.floor else after
        released = max(before - after, 0)
        if released >= MIN_GROWTH:
            log.info("returned %d MiB of freed memory to the OS", released >> 20)
        return released
