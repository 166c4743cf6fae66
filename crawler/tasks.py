"""Celery task ``crawler.ingest``: one crawl of one source, run in a child process.

Twisted's reactor cannot be restarted inside a long-lived worker, so the spider always runs in a fresh
``python -m crawler.run`` process; the task records the outcome in ``CrawlState`` (counts by the child,
errors here) and retries transient failures with backoff. Re-running is safe: crawls are idempotent.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import shared_task

from core.settings import get_settings
from core.types import utcnow
from crawler.run import SOURCES, CrawlError, crawl
from crawler.state import record_run

log = logging.getLogger(__name__)


@shared_task(
    name="crawler.ingest",
    bind=True,
    acks_late=True,
    max_retries=3,
    default_retry_delay=300,
    soft_time_limit=3 * 3600,
    time_limit=3 * 3600 + 300,
)
def ingest(self: Any, source: str, limit: int | None = None) -> dict[str, Any]:
    """Crawl ``source`` (``civitai`` | ``huggingface``); returns the run's summary as a dict."""
    settings = get_settings()
    if source not in SOURCES:
        raise CrawlError(f"unknown source {source!r}; choose one of: {', '.join(SOURCES)}")
    started = utcnow()
    try:
        summary = crawl(settings, source, limit=limit, subprocess=True)
        if summary.nothing_fetched:  # the source is down or refusing us: try again later
            raise CrawlError(f"nothing could be fetched from {source}: {summary.first_failure}")
    except CrawlError as exc:
        log.error("ingest of %s failed: %s", source, exc)
        record_run(settings, source, None, error=str(exc), started_at=started)
        raise self.retry(exc=exc, countdown=min(3600, 300 * 2**self.request.retries)) from exc
    return summary.to_dict()
