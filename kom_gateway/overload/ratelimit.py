"""Token buckets for rate-limit rules (qps with a burst), by key, pure and clock-free."""

from __future__ import annotations

import math
from collections import OrderedDict

from kom_gateway.tokenbucket import TokenBucket


class BucketSet:
    """Buckets by key (one per client for `per: client` rules), least recently used
    evicted past `capacity`, so a flood of new client keys cannot grow memory. An
    evicted client comes back with a full burst, which is the gentle failure mode."""

    __slots__ = ("_buckets", "burst", "capacity", "qps")

    def __init__(self, qps: float, burst: float, capacity: int = 10000) -> None:
        self.qps = qps
        self.burst = burst
        self.capacity = capacity
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()

    def take(self, key: str, now: float) -> float:
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= self.capacity:
                self._buckets.popitem(last=False)
            bucket = self._buckets[key] = TokenBucket(self.qps, self.burst, now)
        else:
            self._buckets.move_to_end(key)
        return bucket.take(now)

    def __len__(self) -> int:
        return len(self._buckets)


def whole_seconds(wait: float) -> int:
    """Retry-After must be an integer for client-go to retry: round up, at least 1."""
    return max(1, math.ceil(wait))
