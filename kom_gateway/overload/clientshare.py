"""What one client may hold of a replica: response bytes buffered for it (pure).

Response data waits in the gateway while its client has not read it: at most one
upstream stream window per stream, since the upstream is credited only for bytes the
client took. A client with many streams that never reads would still hold many windows.
Past `max_buffered` bytes across a client's streams, credit for bytes it does take is
held back too, and handed out once it is back under the budget: the client then waits
on itself, and nobody else's memory or upstream window is spent on it. (The number of
its requests in flight is `Admission`'s business.)

Each stream still pulls one window, so what a client can pin is bounded by the budget
plus its streams' windows, and others' streams are bounded by their per-client in-flight
limit. Exempt clients are never shed, so they are bounded here instead: an exempt
request fetches only with a seat (at most `max_seats` per client, and none while the
client is over budget); without one it waits its turn, unshed, until its own client
reads or finishes something.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

Credit = Callable[[int], None]  # returns that many bytes of flow-control credit upstream


class ClientBuffers:
    def __init__(self, max_buffered: int = 0) -> None:
        self.max_buffered = max_buffered  # bytes per client (0: no budget)
        self.buffered: dict[str, int] = {}  # client key -> bytes held for it now
        self._held: dict[str, list[tuple[Credit, int]]] = {}  # owed once under budget
        self.total = 0
        self.max_seats = 0  # exempt requests fetching at once, per client (0: no cap)
        self.seated: dict[str, int] = {}
        self._waiting: dict[str, deque[Callable[[], None]]] = {}  # exempt, in turn

    def seat(self, key: str, start: Callable[[], None]) -> bool:
        """An exempt request may fetch now (True: it holds a seat until `unseat`), or
        `start()` is called once it may (holding a seat then)."""
        if key not in self._waiting and self._may_seat(key):
            self.seated[key] = self.seated.get(key, 0) + 1
            return True
        self._waiting.setdefault(key, deque()).append(start)
        return False

    def unseat(self, key: str) -> None:
        left = self.seated[key] - 1
        if left:
            self.seated[key] = left
        else:
            del self.seated[key]
        if self._waiting:
            self._wake(key)

    def waiting(self, key: str) -> int:
        return len(self._waiting.get(key, ()))

    def _may_seat(self, key: str) -> bool:
        most = self.max_seats
        return not self.over_budget(key) and (not most or self.seated.get(key, 0) < most)

    def _wake(self, key: str) -> None:
        queue = self._waiting.get(key)
        while queue and self._may_seat(key):
            start = queue.popleft()
            self.seated[key] = self.seated.get(key, 0) + 1
            start()
        if not queue:
            self._waiting.pop(key, None)

    def over_budget(self, key: str) -> bool:
        return 0 < self.max_buffered <= self.buffered.get(key, 0)

    def hold(self, key: str, size: int) -> None:
        """`size` bytes are now queued for the client."""
        if size:
            self.buffered[key] = self.buffered.get(key, 0) + size
            self.total += size

    def release(self, key: str, size: int, credit: Credit, amount: int) -> None:
        """`size` bytes left for the client (or were dropped with it); `credit(amount)`
        returns their flow-control credit upstream: now, or once the client is under
        budget. (A callable and its argument, not a closure: this runs per DATA frame.)"""
        left = self.buffered.get(key, 0) - size
        if size:
            self.total -= size
            if left:
                self.buffered[key] = left
            else:
                del self.buffered[key]
        if 0 < self.max_buffered <= left:
            self._held.setdefault(key, []).append((credit, amount))
            return
        credit(amount)
        if self._held:
            for owed, owed_amount in self._held.pop(key, ()):
                owed(owed_amount)
        if self._waiting:
            self._wake(key)

    def largest(self) -> int:
        return max(self.buffered.values(), default=0)

    def clients_over_budget(self) -> int:
        if not self.max_buffered:
            return 0
        return sum(1 for n in self.buffered.values() if n >= self.max_buffered)
