"""Hugging Face Hub spider: ``/api/models`` listing (``Link`` pagination), model info, raw model card."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Iterator
from typing import Any
from urllib.parse import quote, urlencode, urljoin, urlsplit

from scrapy.http import Request, Response
from scrapy.spidermiddlewares.httperror import HttpError
from twisted.python.failure import Failure

from crawler.items import SourceRecord
from crawler.normalize.hashing import hf_content_hash
from crawler.spiders.base import SourceSpider

PAGE_SIZE = 100
MAX_CARD_BYTES = 256 * 1024
_LINK_NEXT = re.compile(r'<([^>]+)>\s*;\s*rel="?next"?')
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.\-]{0,95}(/[\w.\-]{1,96})?$")


def next_link(header: str | bytes | None, base: str = "") -> str | None:
    """The ``rel="next"`` URL of an RFC 8288 ``Link`` header, resolved against ``base``; only an
    http(s) URL (the header comes from the network)."""
    if not header:
        return None
    text = header.decode("latin-1") if isinstance(header, bytes) else header
    match = _LINK_NEXT.search(text)
    if not match:
        return None
    url = urljoin(base, match.group(1).strip()) if base else match.group(1).strip()
    return url if urlsplit(url).scheme in ("http", "https") and urlsplit(url).netloc else None


class HuggingFaceSpider(SourceSpider):
    """One item per Hub repo: listing (newest first) → ``/api/models/{repo}?blobs=true`` (siblings with
    LFS SHA-256, ``cardData``) → ``/{repo}/raw/main/README.md`` (YAML front matter). Repos whose listing
    entry is unchanged since the last run are not fetched again.

    @url https://huggingface.co/api/models?library=diffusers&filter=lora&full=true&limit=100
    """

    name = "huggingface"
    source = "huggingface"

    @property
    def hub(self) -> str:
        return self.app_settings.hf_url.rstrip("/")

    def first_page_url(self) -> str:
        params: list[tuple[str, str]] = [("library", "diffusers")]
        if self.kind != "checkpoint":
            params.append(("filter", "lora"))
        if self.base_model:
            params.append(("filter", f"base_model:{self.base_model}"))
        params += [("full", "true"), ("limit", str(PAGE_SIZE)), ("sort", "lastModified"), ("direction", "-1")]
        return f"{self.hub}/api/models?{urlencode(params)}"

    async def start(self) -> AsyncIterator[Request]:
        self.load_known()
        for request in self.retry_requests():
            self.take()
            yield request
        yield self.listing_request(self.first_page_url())

    def item_request(self, version_id: str) -> Request:
        return Request(
            f"{self.hub}/api/models/{quote(version_id)}?blobs=true",
            callback=self.parse_info,
            errback=self.on_error,
            cb_kwargs={"repo_id": version_id},
            meta={"version_id": version_id},
        )

    def parse(self, response: Response, **kwargs: Any) -> Iterator[Any]:
        data, retry = self.load_json(response)
        if data is None:
            if retry is not None:
                yield retry
            return
        if not isinstance(data, list):
            self.page_failed(response.url, response.meta, "broken_page")
            return
        seen = unchanged = old = 0
        for info in data:
            repo_id = info.get("id") or info.get("modelId") if isinstance(info, dict) else None
            if not isinstance(repo_id, str) or not _REPO_ID.match(repo_id) or ".." in repo_id:
                self.count("failed", "missing_fields")
                continue
            seen += 1
            if self.older_than_since(info.get("lastModified")):
                old += 1
                self.count("skipped", "older_than_since")
            elif self.known.get(repo_id) == hf_content_hash(info):
                unchanged += 1
                self.count("skipped", "unchanged")
            elif self.take():
                yield self.item_request(repo_id)
        yield from self.after_page(response.url, seen, unchanged, old, next_link(response.headers.get(b"Link"), response.url))

    def parse_info(self, response: Response, repo_id: str) -> Iterator[Any]:
        data, retry = self.load_json(response)
        if data is None:
            if retry is not None:
                yield retry
            return
        if not isinstance(data, dict) or data.get("id", repo_id) != repo_id:
            self.count("failed", "missing_fields")
            return
        info = {"id": repo_id, **data}
        yield Request(
            f"{self.hub}/{quote(repo_id)}/raw/main/README.md",
            callback=self.parse_card,
            errback=self.card_missing,
            cb_kwargs={"info": info},
            meta={"download_maxsize": MAX_CARD_BYTES * 4, "version_id": repo_id},
        )

    def record(self, info: dict[str, Any], card: str | None) -> SourceRecord:
        return SourceRecord(
            source=self.source,
            version_id=info["id"],
            model=info,
            card=card,
            content_hash=hf_content_hash(info),
            url=f"{self.hub}/api/models/{info['id']}",
        )

    def parse_card(self, response: Response, info: dict[str, Any]) -> Iterator[Any]:
        text = response.body[:MAX_CARD_BYTES].decode("utf-8", errors="replace")
        yield self.record(info, text)

    def card_missing(self, failure: Failure) -> Iterator[Any]:
        """A repo without a README is still an expert (the API's ``cardData`` is used alone)."""
        request = failure.request  # type: ignore[attr-defined]
        if failure.check(HttpError):
            self.crawler.stats.inc_value("diffgraph/anomaly/no_model_card")
            yield self.record(request.cb_kwargs["info"], None)
        else:
            yield from self.on_error(failure)
