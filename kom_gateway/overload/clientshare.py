"""What one client may hold of a replica: response bytes buffered for it (pure).

Response data waits in the gateway while its client has not read it: at most one
upstream stream window per stream, since the upstream is credited only for bytes the
client took. A client with many streams that never reads would still hold many windows.
Past `max_buffered` bytes across a client's streams, credit for bytes it does take is
held back too, and handed out once it is back under the budget: the client then waits
on itself, and nobody else's memory or upstream window is spent on it. (The number of
its requests in flight is `Admission`'s business.)
"""

from __future__ import annotations

from collections.abc import Callable

Credit = Callable[[int], None]  # returns that many bytes of flow-control credit upstream


class ClientBuffers:
    def __init__(self, max_buffered: int = 0) -> None:
        self.max_buffered = max_buffered  # bytes per client (0: no budget)
        self.buffered: dict[str, int] = {}  # client key -> bytes held for it now
        self._held: dict[str, list[tuple[Credit, int]]] = {}  # owed once under budget
        self.total = 0

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

    def largest(self) -> int:
        return max(self.buffered.values(), default=0)

    def clients_over_budget(self) -> int:
        if not self.max_buffered:
            return 0
        return sum(1 for n in self.buffered.values() if n >= self.max_buffered)
