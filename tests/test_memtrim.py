"""Returning memory freed after a burst (pure: RSS, clock and trim passed in)."""

from kom_gateway.server import memtrim
from kom_gateway.server.memtrim import INTERVAL, MIN_GROWTH, MemoryTrimmer


def test_trims_at_most_once_a_minute_and_only_above_the_floor():
    rss = [100 << 20]
    now = [0.0]
    trims = []

    def trim(pad: int) -> int:
        trims.append(now[0])
        rss[0] = 110 << 20  # what was in use
        return 1

    t = MemoryTrimmer(trim, lambda: rss[0], lambda: now[0])
    rss[0] = 150 << 20  # a burst
    assert t.maybe_trim() == 0 and trims == []  # not due yet
    now[0] = INTERVAL
    assert t.maybe_trim() == 40 << 20 and trims == [INTERVAL]
    assert t.floor == 100 << 20  # the lowest seen
    rss[0] = (100 << 20) + MIN_GROWTH - 1
    now[0] = 3 * INTERVAL
    assert t.maybe_trim() == 0 and len(trims) == 1  # not enough above the floor


def test_real_malloc_trim_runs_here():
    trim = memtrim._malloc_trim()
    assert trim is not None  # glibc (the image's) has it
    assert trim(0) in (0, 1)
    assert memtrim.rss_bytes() > 0
