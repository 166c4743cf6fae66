"""Downloader middlewares: Scrapy's retries with backoff and host-wide ``Retry-After``, per-source auth headers."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from typing import Any
from urllib.parse import urlsplit

from scrapy import Request
from scrapy.crawler import Crawler
from scrapy.downloadermiddlewares.retry import RetryMiddleware
from scrapy.http import Response
from scrapy.settings import BaseSettings
from scrapy.utils.response import response_status_message

from crawler.retry_after import retry_after_seconds

log = logging.getLogger(__name__)

class BackoffRetryMiddleware(RetryMiddleware):
    """Scrapy's ``RetryMiddleware`` (its ``RETRY_HTTP_CODES``, ``RETRY_EXCEPTIONS`` — which name Scrapy's own
    download errors —, ``RETRY_TIMES``, stats and give-up logging) with two additions:

    * a jittered exponential backoff before each retry (``RETRY_BACKOFF_BASE``, capped by
      ``RETRY_BACKOFF_MAX``), an asyncio sleep of that one request while the others keep flowing;
    * a ``Retry-After`` pauses the whole host, not just the request that got it: every request to that
      host waits in ``process_request`` until the pause ends. A server's value is capped by
      ``RETRY_AFTER_MAX`` (from ``DIFFGRAPH_CRAWL_RETRY_AFTER_MAX_S``) so a hostile header cannot stall a
      crawl for days.
    """

    def __init__(self, settings: BaseSettings) -> None:
        super().__init__(settings)
        self.base = settings.getfloat("RETRY_BACKOFF_BASE", 0.5)
        self.cap = settings.getfloat("RETRY_BACKOFF_MAX", 60.0)
        self.retry_after_max = settings.getfloat("RETRY_AFTER_MAX", 300.0)
        self.paused_until: dict[str, float] = {}  # host -> time.monotonic() when requests may go again

    def _backoff(self, request: Request) -> float:
        attempt = int(request.meta.get("retry_times", 0))
        return min(self.cap, self.base * (2**attempt) * (1 + 0.25 * random.random()))

    def pause_host(self, url: str, seconds: float) -> float:
        """Hold every request to ``url``'s host for ``seconds`` (capped); returns the pause applied."""
        seconds = min(max(0.0, seconds), self.retry_after_max)
        host = urlsplit(url).netloc
        self.paused_until[host] = max(self.paused_until.get(host, 0.0), time.monotonic() + seconds)
        self.crawler.stats.inc_value("diffgraph/retry_after_pauses")
        log.info("pausing %s for %.1fs (Retry-After)", host, seconds)
        return seconds

    async def process_request(self, request: Request) -> None:
        wait = self.paused_until.get(urlsplit(request.url).netloc, 0.0) - time.monotonic()
        if wait > 0:
            self.crawler.stats.inc_value("diffgraph/retry_wait_s", wait)
            await asyncio.sleep(wait)

    async def process_response(self, request: Request, response: Response) -> Request | Response:
        if request.meta.get("dont_retry") or response.status not in self.retry_http_codes:
            return response
        after = retry_after_seconds(response.headers.get(b"Retry-After"))
        if after:
            self.pause_host(request.url, after)
        retry = self._retry(request, response_status_message(response.status))
        if retry is None:
            return response
        await self._sleep(request, retry)
        return retry

    async def process_exception(self, request: Request, exception: Exception) -> Request | None:
        if request.meta.get("dont_retry") or not isinstance(exception, self.exceptions_to_retry):
            return None
        retry = self._retry(request, exception)
        if retry is not None:
            await self._sleep(request, retry)
        return retry

    async def _sleep(self, request: Request, retry: Request) -> None:
        delay = self._backoff(request)
        self.crawler.stats.inc_value("diffgraph/retry_wait_s", delay)
        log.info("retrying %s in %.2fs", request.url, delay)
        await asyncio.sleep(delay)


class SourceAuthMiddleware:
    """``Authorization: Bearer`` for the configured source API tokens, only on their own hosts (a token
    never travels to a third-party URL that an API response points at)."""

    def __init__(self, tokens: dict[str, str]) -> None:
        self.tokens = {host: tok for host, tok in tokens.items() if host and tok}

    @classmethod
    def from_crawler(cls, crawler: Crawler) -> SourceAuthMiddleware:
        settings: Any = crawler.settings.get("DIFFGRAPH_SETTINGS")
        tokens: dict[str, str] = {}
        if settings is not None:
            tokens[urlsplit(settings.civitai_api_url).netloc] = settings.civitai_token.get_secret_value()
            tokens.setdefault(urlsplit(settings.hf_url).netloc, settings.hf_token.get_secret_value())
        return cls(tokens)

    def process_request(self, request: Request) -> None:
        token = self.tokens.get(urlsplit(request.url).netloc)
        if token and b"Authorization" not in request.headers:
            request.headers[b"Authorization"] = f"Bearer {token}".encode()
