"""Token buckets for rate-limit rules (qps with a burst), pure and clock-free."""

from __future__ import annotations

import math
from collections import OrderedDict


class TokenBucket:
    __slots__ = ("burst", "qps", "tokens", "updated")

    def __init__(self, qps: float, burst: float, now: float) -> None:
        self.qps = qps
        self.burst = burst
        self.tokens = burst
        self.updated = now

    def take(self, now: float) -> float:
        """Take a token: 0.0 if granted, else the seconds until one will be there."""
        elapsed = now - self.updated
        if elapsed > 0:
            self.tokens = min(self.burst, self.tokens + elapsed * self.qps)
            self.updated = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.qps


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
