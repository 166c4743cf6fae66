"""Dedupe: one expert per (source, version id) per run, unchanged versions skipped, and the same weight file
(SHA-256) registered once across sources."""

from __future__ import annotations

from crawler.items import SourceRecord
from crawler.pipelines.base import Stage
from crawler.state import known_hashes, known_sha256


class DedupePipeline(Stage):
    stage = "dedupe"

    def open_spider(self) -> None:
        self.seen: set[tuple[str, str]] = set()
        self.sha_owner = known_sha256(self.settings)
        self.known: dict[str, dict[str, str]] = {}

    def _known(self, source: str) -> dict[str, str]:
        if source not in self.known:
            self.known[source] = known_hashes(self.settings, source)
        return self.known[source]

    def process_item(self, item: SourceRecord) -> SourceRecord:
        expert = item.expert
        assert expert is not None
        key = (item.source, item.version_id)
        if key in self.seen:
            raise self.skip("duplicate_in_run", item)
        self.seen.add(key)
        if self._known(item.source).get(item.version_id) == expert.content_hash:
            raise self.skip("unchanged", item)
        primary = expert.primary_file
        if primary is not None and primary.sha256:
            owner = self.sha_owner.setdefault(primary.sha256, expert.id)
            if owner != expert.id:
                raise self.skip("duplicate_sha256", item)
        return item
