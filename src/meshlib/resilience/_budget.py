"""The retry budget: retries may add at most a share of recent traffic, plus a floor.

Per-request retry limits alone multiply load when a whole service is down (every caller
retries every request); a budget caps the extra load at ``ratio`` of the requests seen in
the last ``ttl`` seconds plus ``min_per_second`` retries per second so that low-traffic
callers can still retry. This is Finagle's ``RetryBudget`` and Linkerd's retry budget:
deposits are requests, withdrawals are retries, both expiring after ``ttl``.
"""

from __future__ import annotations

import math
import threading
import time

__all__ = ["RetryBudget"]

_BUCKETS = 10


class RetryBudget:
    """Counts requests and retries in a sliding window of ``ttl`` seconds."""

    __slots__ = (
        "_lock",
        "_requests",
        "_retries",
        "_stamps",
        "_width",
        "min_per_second",
        "ratio",
        "ttl",
    )

    def __init__(self, ratio: float, min_per_second: int, ttl: float = 10.0) -> None:
        self.ratio = ratio
        self.min_per_second = min_per_second
        self.ttl = ttl
        self._width = ttl / _BUCKETS
        self._requests = [0] * _BUCKETS
        self._retries = [0] * _BUCKETS
        self._stamps = [-1] * _BUCKETS
        self._lock = threading.Lock()

    def _bucket(self, now: float) -> int:
        """Index of the bucket for ``now``, cleared if it held an older period."""
        period = int(now / self._width)
        index = period % _BUCKETS
        if self._stamps[index] != period:
            self._stamps[index] = period
            self._requests[index] = 0
            self._retries[index] = 0
        return index

    def record_request(self, now: float | None = None) -> None:
        """Deposit: one logical request was made."""
        now = time.monotonic() if now is None else now
        with self._lock:
            self._requests[self._bucket(now)] += 1

    def try_retry(self, now: float | None = None) -> bool:
        """Withdraw one retry if the budget allows it; False means do not retry."""
        now = time.monotonic() if now is None else now
        with self._lock:
            index = self._bucket(now)
            oldest = int(now / self._width) - _BUCKETS + 1
            requests = retries = 0
            for i in range(_BUCKETS):
                if self._stamps[i] >= oldest:
                    requests += self._requests[i]
                    retries += self._retries[i]
            allowed = math.floor(self.min_per_second * self.ttl + self.ratio * requests)
            if retries >= allowed:
                return False
            self._retries[index] += 1
            return True
