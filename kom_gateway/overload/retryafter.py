"""Retry-After that grows while requests keep being shed and shrinks once they stop.

Modelled on kube-apiserver's APF (`droppedRequestsTracker`): the value starts at `low`.
At every new second, looking at the last `value` seconds: if at least 3 x value requests
were shed and the last raise is at least `value` seconds old, the value doubles (up to
`high`); if fewer than `value` were shed, it goes down by one. Two departures from APF,
so that clients are not told to stay away long after the overload ended: the value is
recomputed every second, not only when a request is dropped, and every second in which
nothing was shed lowers it by one, so it is back at `low` within `high` seconds.
"""

from __future__ import annotations

from collections import deque


class RetryAfter:
    __slots__ = ("_history", "_now_count", "_now_second", "_raised_at", "high", "low", "value")

    def __init__(self, low: int = 1, high: int = 32) -> None:
        self.low = low
        self.high = max(high, low)
        self.value = low
        self._history: deque[tuple[int, int]] = deque()  # (second, shed), past seconds only
        self._now_second = -1
        self._now_count = 0
        self._raised_at = -(1 << 62)

    def shed(self, now: float) -> int:
        """Record one shed request at `now`; the Retry-After to send with it."""
        self._advance(int(now))
        self._now_count += 1
        return self.value

    def current(self, now: float) -> int:
        self._advance(int(now))
        return self.value

    def _advance(self, second: int) -> None:
        if second <= self._now_second:
            return
        if self._now_count:
            self._history.append((self._now_second, self._now_count))
        self._now_count = 0
        start = max(self._now_second + 1, second - 2 * self.high)  # older steps: no history
        if self._now_second < 0:
            start = second
        for step in range(start, second + 1):
            self._update(step)
        self._now_second = second

    def _update(self, second: int) -> None:
        """Recompute at the start of `second` from the shed counts of [second-value, second)."""
        history = self._history
        while history and second - history[0][0] > self.high:
            history.popleft()
        shed = sum(count for at, count in history if second - at <= self.value)
        quiet = not history or history[-1][0] != second - 1  # nothing shed last second
        if second - self._raised_at >= self.value and shed >= 3 * self.value:
            if self.value < self.high:
                self.value = min(self.value * 2, self.high)
                self._raised_at = second
        elif (quiet or shed < self.value) and self.value > self.low:
            self.value -= 1
