"""Counters for dropped input and a per-source log limiter, sans-IO.

Servers never crash on bad input: they drop it, count it under a short reason,
and log it at most once per source per interval so a flood cannot fill the disk.
The limiter's memory is bounded: when full it forgets the oldest sources.
"""

from __future__ import annotations

from collections import Counter, OrderedDict


class DropStats:
    """`drop(reason, source, now)` counts; it returns True when this drop should be logged."""

    def __init__(self, log_interval: float = 10.0, max_sources: int = 4096) -> None:
        self.counts: Counter[str] = Counter()
        self.log_interval = log_interval
        self.max_sources = max_sources
        self._last_logged: OrderedDict[str, float] = OrderedDict()

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def drop(self, reason: str, source: str, now: float) -> bool:
        self.counts[reason] += 1
        last = self._last_logged.get(source)
        if last is not None and now - last < self.log_interval:
            return False
        self._last_logged[source] = now
        self._last_logged.move_to_end(source)
        while len(self._last_logged) > self.max_sources:
            self._last_logged.popitem(last=False)
        return True

    def snapshot(self) -> dict[str, int]:
        return dict(self.counts)
