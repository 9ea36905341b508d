"""Request timeouts without a timer per request (pure; time is passed in).

An event-loop timer per request costs more than the rest of a small GET's bookkeeping
(uvloop: ~4 µs to arm and cancel one). Request timeouts are coarse (60 s by default), so
requests are filed in one-`tick` slots instead and a single periodic sweep expires whole
slots: O(1) to add and to remove, and a timeout fires at most one tick late.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Generic, TypeVar

T = TypeVar("T", bound=Hashable)


class Deadlines(Generic[T]):
    def __init__(self, tick: float = 0.25) -> None:
        self.tick = tick
        self._slots: dict[int, dict[T, None]] = {}  # slot -> items due in it (ordered)
        self._slot_of: dict[T, int] = {}
        self._swept = -1  # every slot up to this one has been expired

    def __len__(self) -> int:
        return len(self._slot_of)

    def add(self, item: T, when: float) -> None:
        """`item` is due at `when` (replacing an earlier deadline of it)."""
        self.remove(item)
        slot = max(int(when / self.tick) + 1, self._swept + 1)  # never fire early
        items = self._slots.get(slot)
        if items is None:
            items = self._slots[slot] = {}
        items[item] = None
        self._slot_of[item] = slot

    def remove(self, item: T) -> None:
        slot = self._slot_of.pop(item, None)
        if slot is not None:
            items = self._slots[slot]
            del items[item]
            if not items:
                del self._slots[slot]

    def expired(self, now: float) -> list[T]:
        """Items whose deadline has passed by `now`, removed, oldest first."""
        upto = int(now / self.tick)
        due: list[T] = []
        if upto <= self._swept:
            return due
        for slot in sorted(s for s in self._slots if s <= upto):
            for item in self._slots.pop(slot):
                del self._slot_of[item]
                due.append(item)
        self._swept = upto
        return due
