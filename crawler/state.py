"""Crawl bookkeeping in SQL: known versions (incremental crawls) and per-source run counters."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from core.records import CrawlItem, CrawlState, ExpertFileRecord, session_scope
from core.settings import Settings
from core.types import utcnow

SOURCES = ("civitai", "huggingface")
log = logging.getLogger(__name__)
_CURSOR_MAX = 1024  # the column's size
MAX_ATTEMPTS = 5  # a version that failed transiently this many runs in a row is left for a person to look at
RETRIES_PER_RUN = 100


def lifted_policies(settings: Settings) -> set[str]:
    """Quarantine reasons that the current settings no longer apply (``nsfw`` once ``allow_nsfw`` is on)."""
    return {"nsfw"} if settings.allow_nsfw else set()


def known_hashes(settings: Settings, source: str) -> dict[str, str]:
    """``{version id: content hash}`` of every version of ``source`` seen before (registered or
    quarantined): an unchanged one is not processed again. Versions quarantined by a policy that the
    settings have since lifted count as unknown, so the next crawl that meets them registers them."""
    lifted = lifted_policies(settings)
    with session_scope(settings) as s:
        rows = s.execute(
            select(CrawlItem.version_id, CrawlItem.content_hash, CrawlItem.status, CrawlItem.reason)
            .where(CrawlItem.source == source)
        )
        return {
            vid: h for vid, h, status, reason in rows
            if not (status == "quarantined" and (reason or "").split(":", 1)[0] in lifted)
        }


def retry_ids(settings: Settings, source: str) -> list[str]:
    """Versions of ``source`` that failed transiently in earlier runs (a page error, a stage error) and are
    due to be fetched again directly, least recently tried first."""
    with session_scope(settings) as s:
        rows = s.scalars(
            select(CrawlItem.version_id)
            .where(CrawlItem.source == source, CrawlItem.status == "failed", CrawlItem.attempts < MAX_ATTEMPTS)
            .order_by(CrawlItem.last_seen_at, CrawlItem.version_id)
            .limit(RETRIES_PER_RUN)
        )
        return list(rows)


def remember_failures(settings: Settings, source: str, failures: Mapping[str, str]) -> None:
    """Record versions that failed transiently in this run (``{version id: reason}``) for the next run.

    A version already registered keeps its registered record (the graph still has it); a quarantined one
    stays quarantined.
    """
    if not failures:
        return
    now = utcnow()
    with session_scope(settings) as s:
        for version_id, reason in failures.items():
            row = s.get(CrawlItem, (source, version_id))
            if row is None:
                row = CrawlItem(source=source, version_id=version_id, expert_id=f"{source}:{version_id}",
                                content_hash="", first_seen_at=now, status="failed", attempts=0)
                s.add(row)
            elif row.status != "failed":
                continue
            row.attempts = (row.attempts or 0) + 1
            row.last_seen_at = now
            row.reason = reason[:4000]


def known_sha256(settings: Settings) -> dict[str, str]:
    """``{sha256: expert id}`` of every weight file already recorded (cross-source de-duplication)."""
    with session_scope(settings) as s:
        rows = s.execute(
            select(ExpertFileRecord.sha256, ExpertFileRecord.expert_id).where(ExpertFileRecord.sha256.is_not(None))
        )
        return {sha: eid for sha, eid in rows}


def get_state(settings: Settings, source: str) -> dict[str, Any] | None:
    """The ``CrawlState`` row of ``source`` as a dict, ``None`` before the first run."""
    with session_scope(settings) as s:
        row = s.get(CrawlState, source)
        if row is None:
            return None
        return {c.name: getattr(row, c.name) for c in CrawlState.__table__.columns}


def _state_row(s: Session, source: str) -> CrawlState:
    """The source's ``CrawlState`` row, created with zero counters on first use."""
    row = s.get(CrawlState, source)
    if row is None:
        row = CrawlState(source=source, runs=0, total_new=0, total_updated=0, total_skipped=0, total_failed=0)
        s.add(row)
    return row


def record_run(
    settings: Settings,
    source: str,
    counts: Mapping[str, int] | None,
    error: str | None = None,
    started_at: datetime | None = None,
) -> None:
    """Add one run's counts (new/updated/skipped/failed) and its error (if any) to the source's state."""
    counts = dict(counts or {})
    with session_scope(settings) as s:
        row = _state_row(s, source)
        row.runs = (row.runs or 0) + 1
        row.total_new = (row.total_new or 0) + int(counts.get("new", 0))
        row.total_updated = (row.total_updated or 0) + int(counts.get("updated", 0))
        row.total_skipped = (row.total_skipped or 0) + int(counts.get("skipped", 0))
        row.total_failed = (row.total_failed or 0) + int(counts.get("failed", 0))
        row.last_counts = counts
        row.last_error = error[:4000] if error else None
        row.last_started_at = started_at
        row.last_finished_at = utcnow()


def listing_key(first_page_url: str) -> str:
    """Identifies one listing query (filters included): a resume point belongs to the listing it was left in."""
    return hashlib.sha256(first_page_url.encode()).hexdigest()[:16]


def resume_point(settings: Settings, source: str, listing: str) -> str | None:
    """The listing page where the walk of ``listing`` left off in an earlier run, if it did not finish."""
    with session_scope(settings) as s:
        row = s.get(CrawlState, source)
        raw = row.cursor if row is not None else None
    try:
        saved = json.loads(raw) if raw else None
    except ValueError:
        return None
    if isinstance(saved, dict) and saved.get("listing") == listing and isinstance(saved.get("url"), str):
        return saved["url"]
    return None


def save_resume_point(settings: Settings, source: str, listing: str, url: str | None) -> None:
    """Remember where the walk of ``listing`` should continue (``None``: it reached the end)."""
    cursor = json.dumps({"listing": listing, "url": url}) if url else None
    if cursor is not None and len(cursor) > _CURSOR_MAX:
        log.warning("resume URL of %s longer than %d characters; the next run starts from the head", source,
                    _CURSOR_MAX)
        cursor = None
    with session_scope(settings) as s:
        row = _state_row(s, source)
        row.cursor = cursor


def advance_watermark(settings: Settings, source: str, watermark: datetime | None) -> None:
    """Move the source's watermark forward (never back)."""
    with session_scope(settings) as s:
        row = _state_row(s, source)
        current = _aware(row.watermark)
        if watermark is not None and (current is None or _aware(watermark) > current):
            row.watermark = _aware(watermark)


def _aware(dt: datetime | None) -> datetime | None:
    """SQLite hands back naive datetimes for UTC columns; compare everything as aware UTC."""
    if dt is None:
        return None
    return dt.replace(tzinfo=UTC) if dt.tzinfo is None else dt
