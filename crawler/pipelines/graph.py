"""Graph upsert: batched ``GraphStore.upsert_experts`` (BASED_ON, TAGGED, CREATED_BY links).

The embedded database admits one process at a time, and opening plus checkpoint-closing it costs about
0.17 s, more than writing a page of 100 experts (0.1 s). So the store stays open across back-to-back
batches and is closed once no batch came for ``IDLE_CLOSE_S`` or after ``HOLD_MAX_S`` of holding it,
which leaves other processes (a worker, ``diffgraph plan``) a turn well inside their 30 s lock wait.
"""

from __future__ import annotations

import asyncio
import time

from scrapy.crawler import Crawler
from scrapy.exceptions import DropItem

from crawler.items import SourceRecord
from crawler.pipelines.base import BatchStage
from graphdb.backends import open_store
from graphdb.store import GraphStore

IDLE_CLOSE_S = 1.0
HOLD_MAX_S = 5.0


class GraphUpsertPipeline(BatchStage):
    stage = "graph"

    def __init__(self, crawler: Crawler) -> None:
        super().__init__(crawler)
        self._store: GraphStore | None = None
        self._opened_at = 0.0
        self._idle: asyncio.TimerHandle | None = None

    def _cancel_idle_close(self) -> None:
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None

    def _open(self) -> GraphStore:
        self._cancel_idle_close()
        if self._store is None:
            self._store = open_store(self.settings)
            self._opened_at = time.monotonic()
        return self._store

    def _release(self) -> None:
        self._cancel_idle_close()
        store, self._store = self._store, None
        if store is not None:
            start = time.perf_counter()
            store.close()
            self.timed(time.perf_counter() - start)

    def flush(self, items: list[SourceRecord]) -> list[DropItem | None]:
        experts = [i.expert for i in items if i.expert is not None]
        try:
            result = self._open().upsert_experts(experts)
        except BaseException:
            self._release()  # a failed write may leave the connection unusable: reopen next time
            raise
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # called outside the crawl's event loop: nothing would close it later
            loop = None
        if loop is None or time.monotonic() - self._opened_at >= HOLD_MAX_S:
            self._release()
        else:
            self._idle = loop.call_later(IDLE_CLOSE_S, self._release)
        created, updated = set(result.created_ids), set(result.updated_ids)
        for item in items:
            eid = item.expert.id if item.expert else ""
            item.status = "new" if eid in created else "updated" if eid in updated else "unchanged"
            self.stats.inc_value(f"diffgraph/{item.status}")
        return [None] * len(items)

    def close_spider(self) -> None:
        try:
            super().close_spider()
        finally:
            self._release()
