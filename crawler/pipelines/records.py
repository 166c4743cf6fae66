"""SQL records: ``CrawlItem`` (version → content hash, change detection), ``ExpertFileRecord`` (the files
to download later) and the source's ``CrawlState`` watermark, written per batch in one transaction."""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Any

from scrapy import signals
from scrapy.crawler import Crawler
from scrapy.exceptions import DropItem
from sqlalchemy import select, tuple_
from sqlalchemy.orm import Session

from core.records import CrawlItem, ExpertFileRecord, session_scope
from core.types import utcnow
from crawler.items import SourceRecord
from crawler.pipelines.base import BatchStage
from crawler.state import advance_watermark

log = logging.getLogger(__name__)

# Drops that depend only on the record itself: remembered (status "quarantined") with the record's content
# hash, so the next crawl treats the unchanged version as known instead of re-evaluating it on every run.
QUARANTINE_REASONS = {"nsfw", "no_weight_file", "unsupported_type", "missing_name", "invalid_record",
                      "duplicate_sha256", "malformed_record"}


class SqlRecordsPipeline(BatchStage):
    stage = "records"

    @classmethod
    def from_crawler(cls, crawler: Crawler) -> SqlRecordsPipeline:
        pipe = cls(crawler)
        crawler.signals.connect(pipe.item_dropped, signal=signals.item_dropped)
        return pipe

    def open_spider(self) -> None:
        self.watermarks: dict[str, datetime] = {}
        self.quarantine: list[tuple[SourceRecord, str, str]] = []

    def item_dropped(self, item: Any, response: Any = None, exception: Any = None, spider: Any = None) -> None:
        reason = getattr(exception, "reason", "")
        if isinstance(item, SourceRecord) and reason in QUARANTINE_REASONS and item.content_hash:
            self.quarantine.append((item, reason, str(exception)[:500]))

    def _write_quarantine(self) -> None:
        now = utcnow()
        with session_scope(self.settings) as s:
            for item, reason, message in self.quarantine:
                row = s.get(CrawlItem, (item.source, item.version_id))
                if row is not None and row.status == "registered" and reason == "duplicate_sha256":
                    continue
                if row is None:
                    row = CrawlItem(source=item.source, version_id=item.version_id, first_seen_at=now)
                    s.add(row)
                row.expert_id = f"{item.source}:{item.version_id}"
                row.content_hash = item.content_hash
                row.last_seen_at = now
                row.status = "quarantined"
                row.reason = f"{reason}: {message}"  # the code first: ``known_hashes`` reads it
        self.quarantine = []

    def flush(self, items: list[SourceRecord]) -> list[DropItem | None]:
        now = utcnow()
        try:  # the fast path: the whole batch in one transaction with two lookups
            with session_scope(self.settings) as s:
                self._write(s, items, now)
            return [None] * len(items)
        except Exception:
            log.warning("records batch of %d failed; writing item by item", len(items), exc_info=True)
        outcomes: list[DropItem | None] = []
        with session_scope(self.settings) as s:
            for item in items:
                try:
                    with s.begin_nested():  # a savepoint: one bad record fails alone
                        self._write(s, [item], now)
                except Exception as exc:
                    outcomes.append(self.fail("records_error", item, str(exc)[:200], transient=True))
                else:
                    outcomes.append(None)
        return outcomes

    def _write(self, s: Session, items: list[SourceRecord], now: datetime) -> None:
        experts = [i.expert for i in items if i.expert is not None]
        rows = {
            (r.source, r.version_id): r
            for r in s.scalars(
                select(CrawlItem).where(
                    tuple_(CrawlItem.source, CrawlItem.version_id).in_([(i.source, i.version_id) for i in items])
                )
            )
        }
        files: dict[tuple[str, str], ExpertFileRecord] = {
            (r.expert_id, r.name): r
            for r in s.scalars(select(ExpertFileRecord).where(ExpertFileRecord.expert_id.in_([e.id for e in experts])))
        }
        for item in items:
            expert = item.expert
            assert expert is not None
            row = rows.get((item.source, item.version_id))
            if row is None:
                row = CrawlItem(source=item.source, version_id=item.version_id, first_seen_at=now)
                s.add(row)
            row.expert_id = expert.id
            row.content_hash = expert.content_hash
            row.source_updated_at = expert.updated_at or expert.created_at
            row.last_seen_at = now
            row.status = "registered"
            row.reason = None
            row.attempts = 0
            for f in expert.files:
                rec = files.get((expert.id, f.name))
                if rec is None:
                    rec = ExpertFileRecord(expert_id=expert.id, name=f.name, status="pending")
                    files[(expert.id, f.name)] = rec
                    s.add(rec)
                elif rec.sha256 != f.sha256 and rec.status == "downloaded":
                    rec.status, rec.local_path = "pending", None  # the source replaced the file
                rec.url, rec.sha256, rec.autov2 = f.url, f.sha256, f.autov2
                rec.size_bytes, rec.format, rec.primary = f.size_bytes, f.format, f.primary
            stamp = expert.created_at or expert.updated_at
            if stamp is not None and (item.source not in self.watermarks or stamp > self.watermarks[item.source]):
                self.watermarks[item.source] = stamp

    def finish(self) -> None:
        self._write_quarantine()
        for source, mark in self.watermarks.items():
            advance_watermark(self.settings, source, mark)
