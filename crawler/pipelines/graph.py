"""Graph upsert: batched ``GraphStore.upsert_experts`` (BASED_ON, TAGGED, CREATED_BY links).

The embedded database admits one process at a time, so it is opened per batch and closed right after.
"""

from __future__ import annotations

from scrapy.exceptions import DropItem

from crawler.items import SourceRecord
from crawler.pipelines.base import BatchStage
from graphdb.store import store_session


class GraphUpsertPipeline(BatchStage):
    stage = "graph"

    def flush(self, items: list[SourceRecord]) -> list[DropItem | None]:
        experts = [i.expert for i in items if i.expert is not None]
        with store_session(self.settings) as store:
            result = store.upsert_experts(experts)
        created, updated = set(result.created_ids), set(result.updated_ids)
        for item in items:
            eid = item.expert.id if item.expert else ""
            item.status = "new" if eid in created else "updated" if eid in updated else "unchanged"
            self.stats.inc_value(f"diffgraph/{item.status}")
        return [None] * len(items)
