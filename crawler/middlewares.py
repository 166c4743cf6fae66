"""Downloader middlewares: Retry-After aware retries with backoff, and per-source auth headers."""

from __future__ import annotations

import asyncio
import email.utils
import logging
import random
import time
from typing import Any
from urllib.parse import urlsplit

from scrapy import Request
from scrapy.crawler import Crawler
from scrapy.downloadermiddlewares.retry import get_retry_request
from scrapy.http import Response
from twisted.internet import error as twisted_errors

log = logging.getLogger(__name__)

_NETWORK_ERRORS = (
    twisted_errors.TimeoutError,
    twisted_errors.ConnectionRefusedError,
    twisted_errors.ConnectionDone,
    twisted_errors.ConnectionLost,
    twisted_errors.ConnectError,
    twisted_errors.DNSLookupError,
    OSError,
)


def retry_after_seconds(value: str | bytes | None, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or HTTP-date); ``None`` if unusable."""
    if value is None:
        return None
    text = value.decode("latin-1") if isinstance(value, bytes) else value
    text = text.strip()
    if not text:
        return None
    try:
        return max(0.0, float(text))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


class RetryAfterMiddleware:
    """Retry 429/5xx responses and network errors with exponential backoff (jittered), waiting at least
    what the server's ``Retry-After`` asks (capped by ``RETRY_BACKOFF_MAX``). The wait is an asyncio sleep
    on that one request: other requests keep flowing."""

    def __init__(self, crawler: Crawler) -> None:
        s = crawler.settings
        self.crawler = crawler
        self.max_retries = s.getint("RETRY_TIMES", 4)
        self.codes = {int(c) for c in s.getlist("RETRY_HTTP_CODES")}
        self.base = s.getfloat("RETRY_BACKOFF_BASE", 0.5)
        self.cap = s.getfloat("RETRY_BACKOFF_MAX", 60.0)

    @classmethod
    def from_crawler(cls, crawler: Crawler) -> RetryAfterMiddleware:
        return cls(crawler)

    def _delay(self, request: Request, retry_after: float | None) -> float:
        attempt = int(request.meta.get("retry_times", 0))
        backoff = self.base * (2**attempt) * (1 + 0.25 * random.random())
        return min(self.cap, max(backoff, retry_after or 0.0))

    async def _retry(self, request: Request, reason: str, retry_after: float | None) -> Request | None:
        retry = get_retry_request(
            request, spider=self.crawler.spider, reason=reason, max_retry_times=self.max_retries
        )
        if retry is None:
            return None
        delay = self._delay(request, retry_after)
        self.crawler.stats.inc_value("diffgraph/retry_wait_s", delay)
        log.info("retrying %s in %.2fs (%s)", request.url, delay, reason)
        await asyncio.sleep(delay)
        return retry

    async def process_response(self, request: Request, response: Response) -> Request | Response:
        if request.meta.get("dont_retry") or response.status not in self.codes:
            return response
        wait = retry_after_seconds(response.headers.get(b"Retry-After"))
        retry = await self._retry(request, f"HTTP {response.status}", wait)
        return retry or response

    async def process_exception(self, request: Request, exception: Exception) -> Request | None:
        if request.meta.get("dont_retry") or not isinstance(exception, _NETWORK_ERRORS):
            return None
        return await self._retry(request, type(exception).__name__, None)


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
