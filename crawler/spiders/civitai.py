"""Civitai REST API v1 spider: ``/models`` with cursor pagination, ``/model-versions/{id}`` refreshes."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any
from urllib.parse import urlencode

from scrapy.http import Request, Response

from crawler.items import SourceRecord
from crawler.normalize.hashing import civitai_content_hash
from crawler.normalize.kind import CIVITAI_TYPES
from crawler.spiders.base import SourceSpider

DEFAULT_TYPES = ("Checkpoint", "LORA", "LoCon")
PAGE_SIZE = 100


class CivitaiSpider(SourceSpider):
    """One item per model *version* (versions carry files, hashes, trained words and the base model).

    Pages come newest first (``sort=Newest``); a page whose versions are all known and unchanged ends the
    crawl, unless an earlier run left an unfinished walk (see ``SourceSpider``). ``version_ids`` switches to refresh mode: each
    version is fetched from ``/model-versions/{id}`` and completed with its model from ``/models/{id}``.

    @url https://civitai.com/api/v1/models?types=LORA&sort=Newest&limit=100
    """

    name = "civitai"
    source = "civitai"

    def __init__(self, version_ids: list[str] | str | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if isinstance(version_ids, str):
            version_ids = [v for v in version_ids.split(",") if v]
        self.version_ids = [str(v) for v in version_ids or []]

    @property
    def api(self) -> str:
        return self.app_settings.civitai_api_url.rstrip("/")

    def first_page_url(self) -> str:
        types = CIVITAI_TYPES.get(self.kind or "", DEFAULT_TYPES)
        params: list[tuple[str, str]] = [("types", t) for t in types]
        params += [("sort", "Newest"), ("limit", str(PAGE_SIZE))]
        params.append(("nsfw", "true" if self.app_settings.allow_nsfw else "false"))
        if self.base_model:
            params.append(("baseModels", self.base_model))
        return f"{self.api}/models?{urlencode(params)}"

    async def start(self) -> AsyncIterator[Request]:
        self.load_known()
        if self.version_ids:
            for vid in self.version_ids:
                yield self.item_request(vid)
        else:
            for request in self.retry_requests():
                yield request
            yield self.listing_request(self.first_page_url())

    def item_request(self, version_id: str) -> Request:
        return Request(f"{self.api}/model-versions/{version_id}", callback=self.parse_version,
                       errback=self.on_error, meta={"version_id": version_id})

    # listing --------------------------------------------------------------------------------------
    def parse(self, response: Response, **kwargs: Any) -> Iterator[Any]:
        data, retry = self.load_json(response)
        if data is None:
            if retry is not None:
                yield retry
            return
        items = data.get("items") if isinstance(data, dict) else None
        if not isinstance(items, list):
            self.page_failed(response.url, response.meta, "broken_page")
            return
        seen = unchanged = old = 0
        for model in items:
            for record in self.records(model):
                seen += 1
                if self.older_than_since(record.version.get("createdAt") if record.version else None):
                    old += 1
                    self.count("skipped", "older_than_since")
                elif self.known.get(record.version_id) == record.content_hash:
                    unchanged += 1
                    self.count("skipped", "unchanged")
                elif self.take():
                    yield record
        yield from self.after_page(response.url, seen, unchanged, old, self.next_page(data.get("metadata"), response.url))

    def next_page(self, metadata: object, current: str) -> str | None:
        """``metadata.nextPage`` as given; else the current URL with ``cursor=metadata.nextCursor``."""
        if not isinstance(metadata, dict):
            return None
        nxt = metadata.get("nextPage")
        if isinstance(nxt, str) and nxt.startswith(("http://", "https://")):
            return nxt
        cursor = metadata.get("nextCursor")
        if cursor in (None, ""):
            return None
        base = current.split("&cursor=", 1)[0]
        return f"{base}&{urlencode({'cursor': str(cursor)})}"

    def records(self, model: object) -> Iterator[SourceRecord]:
        """The version records of one model; malformed entries are counted, never raised."""
        if not isinstance(model, dict) or model.get("id") is None:
            self.count("failed", "missing_fields")
            return
        versions = model.get("modelVersions")
        if not isinstance(versions, list) or not versions:
            self.count("failed", "missing_versions")
            return
        for version in versions:
            if not isinstance(version, dict) or version.get("id") is None:
                self.count("failed", "missing_fields")
                continue
            yield SourceRecord(
                source=self.source,
                version_id=str(version["id"]),
                model=model,
                version=version,
                content_hash=civitai_content_hash(model, version),
                url=f"{self.api}/model-versions/{version['id']}",
            )

    # refresh --------------------------------------------------------------------------------------
    def parse_version(self, response: Response) -> Iterator[Any]:
        data, retry = self.load_json(response)
        if data is None:
            if retry is not None:
                yield retry
            return
        model_id = data.get("modelId") if isinstance(data, dict) else None
        if model_id is None:
            self.count("failed", "missing_fields")
            return
        yield Request(
            f"{self.api}/models/{model_id}",
            callback=self.parse_model_of_version,
            errback=self.on_error,
            cb_kwargs={"version": data},
            meta={"version_id": response.meta.get("version_id")},
            dont_filter=True,
        )

    def parse_model_of_version(self, response: Response, version: dict[str, Any]) -> Iterator[Any]:
        data, retry = self.load_json(response)
        if data is None:
            if retry is not None:
                yield retry
            return
        if not isinstance(data, dict):
            self.count("failed", "missing_fields")
            return
        versions = [v for v in data.get("modelVersions") or [] if isinstance(v, dict)]
        fresh = next((v for v in versions if str(v.get("id")) == str(version.get("id"))), None)
        model = {**data, "modelVersions": [fresh or version]}
        for record in self.records(model):
            if self.known.get(record.version_id) == record.content_hash:
                self.count("skipped", "unchanged")
            elif self.take():
                yield record
