"""What both spiders share: robust JSON pages, failure counting, the incremental walk of a listing.

A listing is walked newest first. The walk stops at the first page whose versions are all known and
unchanged (the head has caught up with earlier runs), at ``--since``, at the run's item limit, or at the
end. A run that ends before the end of the listing (the item limit, a page that failed for good) leaves a
*resume point*: the first listing page it did not finish. The next run first walks the head, then, once it
meets known versions, continues from the resume point without stopping at known pages. So a scheduled
ingestion with a per-run limit backfills the whole listing over successive runs, and a broken page is
fetched again instead of being lost behind pages that are already known.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator, Mapping
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

import scrapy
from scrapy.http import Request, Response
from scrapy.spidermiddlewares.httperror import HttpError
from twisted.python.failure import Failure

from core.settings import Settings
from crawler.normalize.dates import parse_datetime
from crawler.state import known_hashes, listing_key, resume_point, retry_ids
from crawler.stats import LISTING, RESUME, RETRIED, STOPPED, note_failure, note_retry

log = logging.getLogger(__name__)
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _replace_lone_surrogates(value: Any) -> Any:
    """``value`` with every lone surrogate in its strings (and keys) replaced by U+FFFD."""
    if isinstance(value, str):
        return value.encode("utf-8", "surrogatepass").decode("utf-8", "replace")
    if isinstance(value, list):
        return [_replace_lone_surrogates(v) for v in value]
    if isinstance(value, dict):
        return {_replace_lone_surrogates(k): _replace_lone_surrogates(v) for k, v in value.items()}
    return value


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
        self.listing = ""
        self.resume_from: str | None = None
        self.backfilling = False
        self.left_on_page = 0  # versions of the current listing page refused by the item limit
        self.page_in_flight: str | None = None  # the listing page requested and not parsed yet

    @property
    def app_settings(self) -> Settings:
        return self.settings["DIFFGRAPH_SETTINGS"]

    def first_page_url(self) -> str:
        raise NotImplementedError

    @property
    def own_host(self) -> str:
        return urlsplit(self.first_page_url()).netloc.lower()

    def own_url(self, url: str) -> bool:
        """Whether ``url`` is http(s) on this source's own host (where links taken from API data may lead)."""
        parts = urlsplit(url)
        return parts.scheme in ("http", "https") and parts.netloc.lower() == self.own_host

    def load_known(self) -> None:
        self.known = known_hashes(self.app_settings, self.source)
        self.listing = listing_key(self.first_page_url())
        self.crawler.stats.set_value(LISTING, self.listing)
        self.resume_from = resume_point(self.app_settings, self.source, self.listing)
        self.backfilling = False

    def retry_requests(self) -> Iterator[Request]:
        """Requests for versions that failed transiently in earlier runs (before the listing walk)."""
        for version_id in retry_ids(self.app_settings, self.source):
            if self.limit_reached:
                return
            self.crawler.stats.inc_value(RETRIED)
            yield self.item_request(version_id)

    def item_request(self, version_id: str) -> Request:
        """The first request that fetches one version on its own."""
        raise NotImplementedError

    # the listing walk ---------------------------------------------------------------------------
    def listing_request(self, url: str, **kwargs: Any) -> Request:
        self.page_in_flight = url  # listing pages are walked one at a time
        return Request(url, callback=self.parse, errback=self.on_error, meta={"listing": True}, **kwargs)

    def closed(self, reason: str) -> None:
        """A run stopped from outside (SIGTERM at the crawl timeout, Ctrl-C) continues, next time, at the
        listing page it was on."""
        stats = self.crawler.stats
        if reason != "finished" and self.page_in_flight and stats.get_value(RESUME) is None:
            stats.set_value(RESUME, self.page_in_flight)
            stats.set_value(STOPPED, reason)

    def after_page(self, url: str, seen: int, unchanged: int, old: int, next_url: str | None) -> Iterator[Request]:
        """Where the walk goes after a parsed listing page (``seen`` versions: ``unchanged`` known ones,
        ``old`` ones before ``--since``); records the resume point when the run ends before the end."""
        stats = self.crawler.stats
        left, self.left_on_page = self.left_on_page, 0
        self.page_in_flight = None
        if next_url and not self.own_url(next_url):
            # the next-page link is API data: never follow it off the source (file://, another host)
            log.warning("not following next page %r: not http(s) on %s", next_url[:200], self.own_host)
            self.crawler.stats.inc_value("diffgraph/anomaly/offsite_next_page")
            next_url = None
        if url == self.resume_from:
            self.backfilling = True
        everything_seen = seen > 0 and unchanged + old == seen
        if everything_seen and not self.backfilling:
            stats.set_value(STOPPED, "known_versions" if unchanged else "since")
            if unchanged and self.resume_from:  # the head is caught up: go on with the unfinished walk
                self.backfilling = True
                stats.set_value("diffgraph/backfill_from", self.resume_from)
                yield self.listing_request(self.resume_from, dont_filter=True)
            return
        if everything_seen and old:  # the unfinished walk reached versions older than --since
            stats.set_value(STOPPED, "since")
            return
        if self.limit_reached:
            stats.set_value(STOPPED, "limit")
            # continue on this page if the limit cut it, else on the next one
            stats.set_value(RESUME, url if left else next_url or "")
            return
        if next_url:
            if next_url == self.resume_from:
                self.backfilling = True
            yield self.listing_request(next_url)
        else:
            stats.set_value(STOPPED, "end_of_listing")
            stats.set_value(RESUME, "")

    def page_failed(self, url: str, meta: Mapping[str, Any], reason: str, detail: str = "",
                    retry: bool = True) -> None:
        """A page failed for good, counted as ``failed/<reason>``. A listing walk ends here and the next run
        starts again from this page; a version fetched on its own is fetched again by the next run, unless
        ``retry`` is off (the source says it is gone)."""
        stats = self.crawler.stats
        self.count("failed", reason)
        note_failure(stats, url or "a page", f"{reason} {detail}".strip())
        if meta.get("listing"):
            stats.set_value(RESUME, url)
            stats.set_value(STOPPED, "page_error")
        if retry and meta.get("version_id"):
            note_retry(stats, meta["version_id"], f"{reason}: {detail}" if detail else reason)

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
            self.left_on_page += 1
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
            text = response.text
            data = json.loads(text)
            # JSON may escape lone UTF-16 surrogates ("\ud800"), which no UTF-8 writer (hashes, SQL,
            # graph) accepts: replace them here, once, for everything downstream.
            return (_replace_lone_surrogates(data) if _SURROGATE_ESCAPE.search(text) else data), None
        except (ValueError, AttributeError, RecursionError) as exc:  # RecursionError: nested too deep
            tries = int(response.meta.get("json_retries", 0))
            if tries < JSON_RETRIES:
                log.warning("unparseable JSON from %s (%s); fetching it again", response.url, exc)
                meta = {**response.meta, "json_retries": tries + 1}
                return None, response.request.replace(dont_filter=True, meta=meta)
            log.error("unparseable JSON from %s after %d tries: %s", response.url, tries + 1, exc)
            self.page_failed(response.url, response.meta, "broken_page")
            return None, None

    def on_error(self, failure: Failure) -> Iterator[Any]:
        """A page that failed for good (HTTP error after retries, network error): counted, logged."""
        request = getattr(failure, "request", None)
        log.error("giving up on %s: %s", getattr(request, "url", "?"), failure.getErrorMessage())
        status = failure.value.response.status if failure.check(HttpError) else None
        detail = f"HTTP {status}" if status else f"{failure.type.__name__}: {failure.getErrorMessage()}"
        self.page_failed(getattr(request, "url", ""), getattr(request, "meta", {}), "page_error", detail,
                         retry=status not in (404, 410))
        return iter(())
