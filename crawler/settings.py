"""Scrapy settings derived from ``core.settings.Settings`` (never from a separate settings module).

Politeness: AutoThrottle adapts the delay to the server's latency, at most 4 concurrent requests per host,
a descriptive User-Agent from ``settings.user_agent``, and ``BackoffRetryMiddleware`` (Scrapy's retry) backs
off on 429/5xx and network errors, honouring ``Retry-After`` for the whole host. ``ROBOTSTXT_OBEY`` is off on purpose: the spiders only call the documented
public JSON APIs (Civitai REST API v1, Hugging Face Hub API) and raw model cards, which are meant for
programmatic clients, never HTML pages; rate limits are honoured instead.
"""

from __future__ import annotations

from typing import Any

from core.settings import Settings

ITEM_PIPELINES = {
    "crawler.pipelines.normalize.NormalizePipeline": 100,
    "crawler.pipelines.validate.ValidatePipeline": 200,
    "crawler.pipelines.dedupe.DedupePipeline": 300,
    "crawler.pipelines.register.RegisterPipeline": 400,
    "crawler.pipelines.graph.GraphUpsertPipeline": 500,
    "crawler.pipelines.records.SqlRecordsPipeline": 600,
    "crawler.pipelines.enqueue.EnqueueCalibrationPipeline": 700,
}

DOWNLOADER_MIDDLEWARES = {
    # Scrapy's own retry, in its own slot, with backoff and host-wide Retry-After added
    "scrapy.downloadermiddlewares.retry.RetryMiddleware": None,
    "crawler.middlewares.BackoffRetryMiddleware": 550,
    "crawler.middlewares.SourceAuthMiddleware": 560,
}

RETRY_HTTP_CODES = [429, 500, 502, 503, 504, 522, 524, 408]


def scrapy_settings(settings: Settings, limit: int | None = None, **overrides: Any) -> dict[str, Any]:
    """The Scrapy settings dict for one crawl run; ``limit`` caps the items of the run
    (default ``settings.crawl_item_limit``)."""
    item_limit = settings.crawl_item_limit if limit is None else limit
    out: dict[str, Any] = {
        "BOT_NAME": "diffgraph",
        "USER_AGENT": settings.user_agent,
        "ROBOTSTXT_OBEY": False,
        "COOKIES_ENABLED": False,
        "TELNETCONSOLE_ENABLED": False,
        "LOG_LEVEL": "INFO",
        "CONCURRENT_REQUESTS": 8,
        "CONCURRENT_REQUESTS_PER_DOMAIN": 4,
        "DOWNLOAD_TIMEOUT": 60,
        "DOWNLOAD_MAXSIZE": 64 * 1024 * 1024,  # an API page is never this big; a hostile one is cut off
        "AUTOTHROTTLE_ENABLED": True,
        "AUTOTHROTTLE_START_DELAY": 0.25,
        "AUTOTHROTTLE_MAX_DELAY": 30.0,
        "AUTOTHROTTLE_TARGET_CONCURRENCY": 2.0,
        "RETRY_ENABLED": True,
        "RETRY_TIMES": 4,
        "RETRY_HTTP_CODES": RETRY_HTTP_CODES,
        "RETRY_BACKOFF_BASE": 0.5,  # seconds; doubled per attempt, jittered, capped below
        "RETRY_BACKOFF_MAX": 60.0,
        "RETRY_AFTER_MAX": settings.crawl_retry_after_max_s,  # caps a server's Retry-After
        "CLOSESPIDER_ITEMCOUNT": item_limit or 0,
        "ITEM_PIPELINES": dict(ITEM_PIPELINES),
        "DOWNLOADER_MIDDLEWARES": dict(DOWNLOADER_MIDDLEWARES),
        "HTTPERROR_ALLOWED_CODES": [],
        # http(s) only: a URL taken from API data must never read local files (file://) or reach other
        # protocols; Scrapy fails such a request with NotSupported
        "DOWNLOAD_HANDLERS": {"file": None, "data": None, "s3": None, "ftp": None},
        "STATS_CLASS": "crawler.stats.ThreadSafeStatsCollector",  # batch stages count from worker threads
        "DIFFGRAPH_SETTINGS": settings,
        "DIFFGRAPH_ITEM_LIMIT": item_limit,
        # Items of one response travel the pipelines together (CONCURRENT_ITEMS at a time): a batch of the
        # same size flushes as soon as a page's items arrive; stragglers wait at most the linger time.
        "CONCURRENT_ITEMS": 100,
        "DIFFGRAPH_BATCH_SIZE": 100,
        "DIFFGRAPH_BATCH_LINGER_S": 0.1,
    }
    out.update(overrides)
    return out
