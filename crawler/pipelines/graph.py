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
        self._store: GraphStore | None = None  # used on this stage's worker thread only
        self._opened_at = 0.0
        self._batches = 0

    def _open(self) -> GraphStore:
        if self._store is None:
            self._store = open_store(self.settings)
            self._opened_at = time.monotonic()
        return self._store

    def _release(self) -> None:
        store, self._store = self._store, None
        if store is not None:
            start = time.perf_counter()
            store.close()
            self.timed(time.perf_counter() - start)

    def _release_if_idle(self, batches: int) -> None:
        if self._batches == batches:  # no batch came since the timer was armed
            self._release()

    def flush(self, items: list[SourceRecord]) -> list[DropItem | None]:
        experts = [i.expert for i in items if i.expert is not None]
        try:
            result = self._open().upsert_experts(experts)
        except BaseException:
            self._release()  # a failed write may leave the connection unusable: reopen next time
            raise
        finally:
            self._batches += 1
        if time.monotonic() - self._opened_at >= HOLD_MAX_S:
            self._release()
        created, updated = set(result.created_ids), set(result.updated_ids)
        for item in items:
            eid = item.expert.id if item.expert else ""
            item.status = "new" if eid in created else "updated" if eid in updated else "unchanged"
            self.stats.inc_value(f"diffgraph/{item.status}")
        return [None] * len(items)

    def after_flush(self, loop: asyncio.AbstractEventLoop) -> None:
        batches = self._batches

        def release_if_idle() -> None:
            try:
                self.worker.submit(self._release_if_idle, batches)
            except RuntimeError:  # the stage already closed (and released the store)
                pass

        loop.call_later(IDLE_CLOSE_S, release_if_idle)

    def finish(self) -> None:
        self._release()
