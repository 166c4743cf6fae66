"""Celery task ``crawler.ingest``: one crawl of one source, run in a child process.

Twisted's reactor cannot be restarted inside a long-lived worker, so the spider always runs in a fresh
``python -m crawler.run`` process; the task records the outcome in ``CrawlState`` (counts by the child,
errors here) and retries transient failures with backoff. Re-running is safe: crawls are idempotent.

Scheduled crawls never overlap: a run holds ``diffgraph:crawl-lock:<source>`` in Redis (the broker) and
a beat that finds it held skips its turn. The lock expires a little after the crawl timeout
(``DIFFGRAPH_CRAWL_TIMEOUT_S``, after which the child is stopped), so a worker that died holding it
blocks the source for one timeout at most.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import shared_task

from core.queue import INGEST
from core.retry import retry_or_raise
from core.settings import get_settings
from core.types import utcnow
from crawler.run import SOURCES, STOP_GRACE_S, CrawlError, NothingFetched, crawl
from crawler.state import record_run

log = logging.getLogger(__name__)
LOCK_MARGIN_S = 120  # the lock outlives the longest crawl (timeout + SIGTERM grace) by this much


@shared_task(
    name=INGEST,
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
    lock = crawl_lock(settings, source)
    if lock is not None and not lock.acquire(blocking=False):
        log.warning("crawl of %s skipped: another crawl of it is still running", source)
        return {"source": source, "skipped": "already_running"}
    try:
        return _ingest(self, settings, source, limit)
    finally:
        if lock is not None:
            try:
                lock.release()
            except Exception as exc:  # expired (and maybe taken by a later run): not ours to release
                log.warning("crawl lock of %s was not released: %s", source, exc)


def crawl_lock(settings: Any, source: str) -> Any:
    """The per-source crawl lock (``redis.lock.Lock``), or ``None`` without a Redis broker."""
    if not settings.broker_url.startswith(("redis://", "rediss://", "unix://")):
        return None
    import redis

    client = redis.Redis.from_url(settings.broker_url, socket_connect_timeout=5)
    expire = settings.crawl_timeout_s + STOP_GRACE_S + LOCK_MARGIN_S
    return client.lock(f"diffgraph:crawl-lock:{source}", timeout=expire)


def _ingest(self: Any, settings: Any, source: str, limit: int | None) -> dict[str, Any]:
    started = utcnow()
    try:
        summary = crawl(settings, source, limit=limit, subprocess=True)
    except CrawlError as exc:
        log.error("ingest of %s failed: %s", source, exc)
        record_run(settings, source, None, error=str(exc), started_at=started)
        retry_or_raise(self, exc, base=300.0, cap=3600.0)  # retried when the child process died
    if summary.nothing_fetched:  # the source is down or refusing us (the run is recorded): try again later
        exc = NothingFetched(summary.error or f"nothing could be fetched from {source}")
        log.error("ingest of %s failed: %s", source, exc)
        retry_or_raise(self, exc, base=300.0, cap=3600.0)
    return summary.to_dict()
