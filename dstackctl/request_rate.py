"""Requests counted per second over the last five minutes: the autoscaler's rate.

The endpoint calls `count()` once per request from its event loop; the agent reads
`requests_in(window)` from its own thread. Counting is an index and an add, so it costs the
proxy nothing it could measure (bench/proxy_bench.py). dstack's gateway keeps the same numbers
from nginx's access log (`PerWindowStats`, windows of 30s, 1m and 5m).
"""

from __future__ import annotations

import time
from collections.abc import Callable

HISTORY_SECONDS = 300  # the longest window dstack allows


class RequestRate:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._counts = [0] * HISTORY_SECONDS
        self._second = int(clock())  # the second that _counts[_second % HISTORY] holds
        self.total = 0

    def count(self, requests: int = 1) -> None:
        second = int(self._clock())
        if second != self._second:
            self._advance(second)
        self._counts[second % HISTORY_SECONDS] += requests
        self.total += requests

    def requests_in(self, window: int) -> int:
        """Requests counted in the last `window` seconds (this second included). Only reads:
        `count()` alone writes, from the endpoint's loop, so the two need no lock."""
        now, last = int(self._clock()), self._second
        first = max(now - min(window, HISTORY_SECONDS) + 1, last - HISTORY_SECONDS + 1)
        return sum(self._counts[second % HISTORY_SECONDS] for second in range(first, last + 1))

    def per_second(self, window: int) -> float:
        return self.requests_in(window) / window

    def _advance(self, second: int) -> None:
        """Zero the seconds that passed without a request (all of them after a long pause)."""
        passed = second - self._second
        for back in range(min(passed, HISTORY_SECONDS)):
            self._counts[(second - back) % HISTORY_SECONDS] = 0
        self._second = second
