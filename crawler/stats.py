"""Crawl stats that spiders and pipelines leave for ``crawler.run`` to persist after the crawl."""

from __future__ import annotations

import threading
from contextlib import nullcontext
from typing import Any

from scrapy.statscollectors import MemoryStatsCollector, StatsCollector

STOPPED = "diffgraph/stopped_at"  # why the listing walk ended
LISTING = "diffgraph/listing"  # which listing (source query) this run walked
RESUME = "diffgraph/resume"  # where the next run continues that walk ("" = it reached the end)
RETRY = "diffgraph/retry"  # {version id: reason} of versions that failed transiently
RETRIED = "diffgraph/retried"  # how many of the earlier failures this run fetched again
FIRST_FAILURE = "diffgraph/first_failure"  # "<what>: <why>" of the run's first failed page or record


def note_failure(stats: StatsCollector, what: str, why: str) -> None:
    """Remember the run's first failure (the one-line reason a run that fetched nothing exits with)."""
    with getattr(stats, "lock", nullcontext()):
        if not stats.get_value(FIRST_FAILURE):
            stats.set_value(FIRST_FAILURE, f"{what}: {' '.join(why.split())}"[:300])


def note_retry(stats: StatsCollector, version_id: str, reason: str) -> None:
    """Have the next run fetch ``version_id`` again (it failed for a reason that may not last)."""
    with getattr(stats, "lock", nullcontext()):  # batch stages call this from their worker threads
        failures = stats.get_value(RETRY)
        if failures is None:
            failures = {}
            stats.set_value(RETRY, failures)
        failures[str(version_id)] = reason


class ThreadSafeStatsCollector(MemoryStatsCollector):
    """Scrapy's in-memory stats with a lock: batch stages update them from their worker threads while the
    event loop updates them too (``inc_value`` is a read-modify-write)."""

    def __init__(self, crawler: Any) -> None:
        super().__init__(crawler)
        self.lock = threading.RLock()

    def set_value(self, key: str, value: Any, spider: Any = None) -> None:
        with self.lock:
            super().set_value(key, value)

    def inc_value(self, key: str, count: int | float = 1, start: int | float = 0, spider: Any = None) -> None:
        with self.lock:
            super().inc_value(key, count, start)

    def max_value(self, key: str, value: Any, spider: Any = None) -> None:
        with self.lock:
            super().max_value(key, value)

    def min_value(self, key: str, value: Any, spider: Any = None) -> None:
        with self.lock:
            super().min_value(key, value)

    def get_stats(self, spider: Any = None) -> dict[str, Any]:
        with self.lock:
            return dict(super().get_stats())
