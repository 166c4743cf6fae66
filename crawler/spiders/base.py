"""What both spiders share: robust JSON pages, failure counting, incremental stop rules."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import scrapy
from scrapy.http import Request, Response
from twisted.python.failure import Failure

from core.settings import Settings
from crawler.normalize.dates import parse_datetime
from crawler.state import known_hashes

log = logging.getLogger(__name__)
JSON_RETRIES = 2  # a truncated/garbled page is fetched again this many times before it counts as failed


class SourceSpider(scrapy.Spider):
    """Base of the source spiders. Arguments (all optional): ``limit`` items, ``base_model``, ``kind``,
    ``since`` (ISO date: older versions are skipped and paging stops at them)."""

    source = ""

    def __init__(
        self,
        limit: int | None = None,
        base_model: str | None = None,
        kind: str | None = None,
        since: str | datetime | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.limit = int(limit) if limit else None
        self.base_model = base_model or None
        self.kind = kind or None
        self.since = since if isinstance(since, datetime) else parse_datetime(since)
        if since and self.since is None:
            raise ValueError(f"--since must be an ISO date such as 2024-01-31, got {since!r}")
        self.emitted = 0
        self.known: dict[str, str] = {}

    @property
    def app_settings(self) -> Settings:
        return self.settings["DIFFGRAPH_SETTINGS"]

    def load_known(self) -> None:
        self.known = known_hashes(self.app_settings, self.source)

    # counting ----------------------------------------------------------------------------------
    def count(self, outcome: str, reason: str, n: int = 1) -> None:
        """``outcome`` is ``failed`` or ``skipped``; totals are summed by ``crawler.run``."""
        self.crawler.stats.inc_value(f"diffgraph/{outcome}/{reason}", n)

    @property
    def limit_reached(self) -> bool:
        return self.limit is not None and self.emitted >= self.limit

    def take(self) -> bool:
        """Reserve one item slot of the run's limit."""
        if self.limit_reached:
            return False
        self.emitted += 1
        return True

    def older_than_since(self, value: object) -> bool:
        when = parse_datetime(value)
        return self.since is not None and when is not None and when < self.since

    # JSON ---------------------------------------------------------------------------------------
    def load_json(self, response: Response) -> tuple[Any, Request | None]:
        """``(data, None)`` or, for an unparseable body, ``(None, retry request or None)``; a page that
        stays broken is counted as ``failed/broken_page`` and never raises."""
        try:
            return json.loads(response.text), None
        except (ValueError, AttributeError) as exc:
            tries = int(response.meta.get("json_retries", 0))
            if tries < JSON_RETRIES:
                log.warning("unparseable JSON from %s (%s); fetching it again", response.url, exc)
                meta = {**response.meta, "json_retries": tries + 1}
                return None, response.request.replace(dont_filter=True, meta=meta)
            log.error("unparseable JSON from %s after %d tries: %s", response.url, tries + 1, exc)
            self.count("failed", "broken_page")
            return None, None

    def on_error(self, failure: Failure) -> Iterator[Any]:
        """A page that failed for good (HTTP error after retries, network error): counted, logged."""
        request = getattr(failure, "request", None)
        log.error("giving up on %s: %s", getattr(request, "url", "?"), failure.getErrorMessage())
        self.count("failed", "page_error")
        return iter(())
