"""Shared pipeline plumbing: outcomes (skip/fail with a counted reason), stage timing, batching."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from scrapy.crawler import Crawler
from scrapy.exceptions import DropItem

from core.settings import Settings
from crawler.items import SourceRecord
from crawler.stats import note_failure, note_retry

log = logging.getLogger(__name__)
T = TypeVar("T")


class Skipped(DropItem):
    """Not an error: known, duplicate or filtered by policy (counted as ``skipped``)."""

    def __init__(self, message: str, reason: str = "") -> None:
        super().__init__(message, log_level="INFO")
        self.reason = reason


class Failed(DropItem):
    """The record cannot become an expert (counted as ``failed``)."""

    def __init__(self, message: str, reason: str = "") -> None:
        super().__init__(message)
        self.reason = reason


class Stage:
    """A pipeline with access to the crawl's stats and the platform settings."""

    stage = "stage"

    def __init__(self, crawler: Crawler) -> None:
        self.crawler = crawler
        self.stats = crawler.stats
        self.settings: Settings = crawler.settings["DIFFGRAPH_SETTINGS"]

    @classmethod
    def from_crawler(cls, crawler: Crawler) -> Stage:
        return cls(crawler)

    def skip(self, reason: str, item: SourceRecord) -> Skipped:
        self.stats.inc_value(f"diffgraph/skipped/{reason}")
        return Skipped(f"{item.source}:{item.version_id} skipped: {reason}", reason)

    def fail(self, reason: str, item: SourceRecord, detail: str = "", transient: bool = False) -> Failed:
        """``transient``: the failure may not last (a database or service error), so the next run fetches
        the version again."""
        self.stats.inc_value(f"diffgraph/failed/{reason}")
        note_failure(self.stats, f"{item.source}:{item.version_id}", f"{reason} {detail}".strip())
        if transient:
            note_retry(self.stats, item.version_id, f"{reason}: {detail}"[:500])
        log.warning("%s:%s failed at %s: %s %s", item.source, item.version_id, self.stage, reason, detail)
        return Failed(f"{item.source}:{item.version_id} failed: {reason} {detail}".strip(), reason)

    def anomaly(self, name: str) -> None:
        self.stats.inc_value(f"diffgraph/anomaly/{name}")

    def timed(self, seconds: float) -> None:
        self.stats.inc_value(f"diffgraph/time/{self.stage}", seconds)


class BatchStage(Stage):
    """A stage that works on batches (embedding, graph and SQL writes) while Scrapy hands items one by one.

    ``process_item`` parks each item until its batch is flushed: when ``DIFFGRAPH_BATCH_SIZE`` items are
    waiting, when none arrived for ``DIFFGRAPH_BATCH_LINGER_S``, or when the spider closes. ``flush`` returns
    one outcome per item: ``None`` (passed on) or a ``DropItem`` to raise for it.

    ``flush`` blocks (LLM calls, embeddings, graph and SQL writes), so it never runs on Scrapy's event loop:
    each stage has one worker thread, which keeps its batches in order and its connections on one thread,
    while the loop goes on downloading and parsing. The crawl's stats are thread-safe
    (``ThreadSafeStatsCollector``).
    """

    def __init__(self, crawler: Crawler) -> None:
        super().__init__(crawler)
        self.batch_size = int(crawler.settings.getint("DIFFGRAPH_BATCH_SIZE", 128))
        self.linger = float(crawler.settings.getfloat("DIFFGRAPH_BATCH_LINGER_S", 0.2))
        self.pending: list[tuple[SourceRecord, asyncio.Future[DropItem | None]]] = []
        self._timer: asyncio.TimerHandle | None = None
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"diffgraph-{self.stage}")

    def flush(self, items: list[SourceRecord]) -> list[DropItem | None]:
        raise NotImplementedError

    def after_flush(self, loop: asyncio.AbstractEventLoop) -> None:
        """Called on the event loop after each batch's outcomes were delivered (e.g. to arm a timer)."""

    async def in_worker(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn`` on this stage's worker thread (after the batches queued before it) and await it."""
        return await asyncio.get_running_loop().run_in_executor(self.worker, fn, *args)

    async def process_item(self, item: SourceRecord) -> SourceRecord:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[DropItem | None] = loop.create_future()
        self.pending.append((item, future))
        if len(self.pending) >= self.batch_size:
            self._flush_now()
        elif self._timer is None:
            self._timer = loop.call_later(self.linger, self._flush_now)
        outcome = await future
        if outcome is not None:
            raise outcome
        return item

    def _take_batch(self) -> list[tuple[SourceRecord, asyncio.Future[DropItem | None]]]:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        batch, self.pending = self.pending, []
        return batch

    def _flush_now(self) -> None:
        """On the loop: hand the waiting items to the worker thread; their outcomes come back to the loop."""
        batch = self._take_batch()
        if not batch:
            return
        loop = asyncio.get_running_loop()
        done = loop.run_in_executor(self.worker, self._flush_batch, [item for item, _ in batch])
        done.add_done_callback(lambda f: self._deliver(batch, f, loop))

    def _deliver(self, batch: list[tuple[SourceRecord, asyncio.Future[DropItem | None]]],
                 done: asyncio.Future[list[DropItem | None]], loop: asyncio.AbstractEventLoop) -> None:
        outcomes = done.result()
        for (_, future), outcome in zip(batch, outcomes, strict=True):
            if not future.done():
                future.set_result(outcome)
        self.after_flush(loop)

    def _flush_batch(self, items: list[SourceRecord]) -> list[DropItem | None]:
        """On the worker thread: ``flush`` with its timing; one bad batch fails its items, never the crawl."""
        start = time.perf_counter()
        try:
            outcomes = self.flush(items)
        except Exception as exc:
            log.exception("%s failed for a batch of %d", self.stage, len(items))
            outcomes = [self.fail(f"{self.stage}_error", item, str(exc)[:200], transient=True) for item in items]
        self.timed(time.perf_counter() - start)
        return outcomes

    def finish(self) -> None:
        """On the worker thread, after the last batch: end-of-crawl writes."""

    async def close_spider(self) -> None:
        batch = self._take_batch()
        try:
            if batch:
                outcomes = await self.in_worker(self._flush_batch, [item for item, _ in batch])
                for (_, future), outcome in zip(batch, outcomes, strict=True):
                    if not future.done():
                        future.set_result(outcome)
            await self.in_worker(self.finish)
        finally:
            self.worker.shutdown(wait=False)
