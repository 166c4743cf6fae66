"""Spider parsing without a reactor: real pages in, records and follow-up requests out."""

from __future__ import annotations

import json

from scrapy.http import Request, TextResponse
from scrapy.utils.test import get_crawler

from crawler.items import SourceRecord
from crawler.settings import scrapy_settings
from crawler.spiders.civitai import CivitaiSpider
from crawler.spiders.huggingface import HuggingFaceSpider, next_link

from .conftest import civitai_items

API = "https://civitai.example/api/v1"


def _spider(settings, cls=CivitaiSpider, **kwargs):
    cfg = settings.model_copy(update={"civitai_api_url": API})
    crawler = get_crawler(cls, settings_dict=scrapy_settings(cfg))
    spider = cls.from_crawler(crawler, **kwargs)
    crawler.spider = spider
    return spider


def _page(body: str | bytes, url: str = f"{API}/models?limit=100", meta: dict | None = None) -> TextResponse:
    request = Request(url, meta=meta or {})
    return TextResponse(url, body=body.encode() if isinstance(body, str) else body, encoding="utf-8",
                        request=request)


def _page_of(items: list[dict], next_page: str | None = None) -> str:
    metadata = {"nextCursor": "abc|123", "nextPage": next_page} if next_page else {}
    return json.dumps({"items": items, "metadata": metadata})


def test_one_record_per_version_and_next_page_as_given(settings) -> None:
    spider = _spider(settings)
    items = civitai_items()[:5]
    nxt = f"{API}/models?limit=100&cursor=abc%7C123"
    out = list(spider.parse(_page(_page_of(items, nxt))))
    records = [o for o in out if isinstance(o, SourceRecord)]
    requests = [o for o in out if isinstance(o, Request)]
    assert len(records) == sum(len(m["modelVersions"]) for m in items)
    assert {r.version_id for r in records} == {str(v["id"]) for m in items for v in m["modelVersions"]}
    assert [r.url for r in requests] == [nxt]


def test_first_page_query(settings) -> None:
    url = _spider(settings, base_model="SD 1.5", kind="lora").first_page_url()
    assert url.startswith(f"{API}/models?types=LORA&sort=Newest&limit=100&nsfw=false")
    assert "baseModels=SD+1.5" in url
    default = _spider(settings).first_page_url()
    assert "types=Checkpoint&types=LORA&types=LoCon" in default


def test_known_unchanged_page_stops_paging(settings) -> None:
    spider = _spider(settings)
    items = civitai_items()[:3]
    records = [o for o in spider.parse(_page(_page_of(items))) if isinstance(o, SourceRecord)]
    spider.known = {r.version_id: r.content_hash for r in records}
    out = list(spider.parse(_page(_page_of(items, f"{API}/models?cursor=2"))))
    assert out == [] and spider.crawler.stats.get_value("diffgraph/stopped_at") == "known_versions"


def test_since_skips_older_versions_and_stops(settings) -> None:
    spider = _spider(settings, since="2024-01-01")
    out = list(spider.parse(_page(_page_of(civitai_items()[:3], f"{API}/models?cursor=2"))))
    assert out == []  # the 2023 snapshot is entirely older
    assert spider.crawler.stats.get_value("diffgraph/skipped/older_than_since") >= 3


def test_limit_caps_records_and_the_next_run_resumes_on_the_cut_page(settings) -> None:
    spider = _spider(settings, limit=2)
    out = list(spider.parse(_page(_page_of(civitai_items()[:5], f"{API}/models?cursor=5"))))
    assert len(out) == 2 and all(isinstance(o, SourceRecord) for o in out)
    assert spider.crawler.stats.get_value("diffgraph/resume") == f"{API}/models?limit=100"


def test_unfinished_walk_stops_at_since_without_a_resume_point(settings) -> None:
    spider = _spider(settings, since="2024-01-01")
    spider.resume_from = f"{API}/models?limit=100"  # this page is where an earlier run left off
    out = list(spider.parse(_page(_page_of(civitai_items()[:3], f"{API}/models?cursor=3"))))
    stats = spider.crawler.stats
    assert out == [] and stats.get_value("diffgraph/stopped_at") == "since"
    assert stats.get_value("diffgraph/resume") is None  # kept for a later run without --since


def test_truncated_page_is_refetched_then_counted(settings) -> None:
    spider = _spider(settings)
    body = _page_of(civitai_items()[:2])[:500]
    (retry,) = list(spider.parse(_page(body)))
    assert isinstance(retry, Request) and retry.meta["json_retries"] == 1 and retry.dont_filter
    assert list(spider.parse(_page(body, meta={"json_retries": 2}))) == []
    assert spider.crawler.stats.get_value("diffgraph/failed/broken_page") == 1


def test_missing_fields_are_counted(settings) -> None:
    spider = _spider(settings)
    page = json.dumps({"items": [{"name": "no id"}, {"id": 3, "modelVersions": []}, "junk"], "metadata": {}})
    assert list(spider.parse(_page(page))) == []
    stats = spider.crawler.stats
    assert stats.get_value("diffgraph/failed/missing_fields") == 2
    assert stats.get_value("diffgraph/failed/missing_versions") == 1


def test_hub_link_header_and_listing(settings) -> None:
    assert next_link('<https://hf.co/api/models?cursor=x>; rel="next"') == "https://hf.co/api/models?cursor=x"
    assert next_link(None) is None
    spider = _spider(settings, cls=HuggingFaceSpider)
    listing = json.dumps([{"id": "a/b", "sha": "1"}, {"id": "../etc", "sha": "2"}])
    response = TextResponse("https://huggingface.co/api/models", body=listing.encode(), encoding="utf-8",
                            headers={"Link": '<https://huggingface.co/api/models?cursor=2>; rel="next"'},
                            request=Request("https://huggingface.co/api/models"))
    out = list(spider.parse(response))
    assert [r.url for r in out] == ["https://huggingface.co/api/models/a/b?blobs=true",
                                    "https://huggingface.co/api/models?cursor=2"]
    assert spider.crawler.stats.get_value("diffgraph/failed/missing_fields") == 1


def test_retry_after_header_forms() -> None:
    from datetime import UTC, datetime, timedelta
    from email.utils import format_datetime

    from crawler.retry_after import retry_after_seconds

    assert retry_after_seconds(b"3") == 3.0
    assert retry_after_seconds("junk") is None and retry_after_seconds(None) is None
    now = datetime(2025, 1, 1, tzinfo=UTC)
    date = format_datetime(now + timedelta(seconds=30), usegmt=True)
    assert retry_after_seconds(date, now=now.timestamp()) == 30.0


def test_auth_header_only_for_the_source_host(settings) -> None:
    from pydantic import SecretStr

    from crawler.middlewares import SourceAuthMiddleware

    cfg = settings.model_copy(update={"civitai_api_url": API, "civitai_token": SecretStr("tok")})
    crawler = get_crawler(CivitaiSpider, settings_dict=scrapy_settings(cfg))
    mw = SourceAuthMiddleware.from_crawler(crawler)
    own, other = Request(f"{API}/models"), Request("https://cdn.elsewhere.example/file")
    mw.process_request(own)
    mw.process_request(other)
    assert own.headers[b"Authorization"] == b"Bearer tok" and b"Authorization" not in other.headers


def test_refresh_by_version_id_uses_the_real_responses(settings) -> None:
    from .conftest import load_json

    spider = _spider(settings, version_ids="1387174")
    version = load_json("civitai_api_model_by_versionId.json")
    (follow,) = list(spider.parse_version(_page(json.dumps(version), f"{API}/model-versions/1387174")))
    assert follow.url == f"{API}/models/1231067"
    model = load_json("civitai_api_model_by_modelId.json")
    (record,) = list(spider.parse_model_of_version(_page(json.dumps(model), follow.url), **follow.cb_kwargs))
    assert record.version_id == "1387174" and record.model["name"] == "Vivid Impressions Storybook Style"
    assert record.version["baseModel"] == "Flux.1 D"


def test_versions_that_failed_before_are_fetched_before_the_listing(settings) -> None:
    import asyncio

    from crawler.state import remember_failures

    remember_failures(settings, "civitai", {"55": "page_error: 503"})
    spider = _spider(settings)

    async def requests() -> list[Request]:
        return [r async for r in spider.start()]

    retry, listing = asyncio.run(requests())
    assert retry.url == f"{API}/model-versions/55" and retry.meta["version_id"] == "55"
    assert listing.url == spider.first_page_url() and listing.meta["listing"]
    assert spider.crawler.stats.get_value("diffgraph/retried") == 1


def test_next_page_links_from_api_data_stay_on_the_source(settings) -> None:
    for bad in ("file:///etc/passwd", f"ftp://{API.split('/')[2]}/models",
                "https://evil.example/api/v1/models?cursor=1"):
        spider = _spider(settings)
        out = list(spider.parse(_page(_page_of(civitai_items()[:1], bad))))
        followed = [o.url for o in out if isinstance(o, Request)]
        assert bad not in followed and all(u.startswith(f"{API}/models?") for u in followed), bad
    assert spider.crawler.stats.get_value("diffgraph/anomaly/offsite_next_page") == 1
    hub = _spider(settings, cls=HuggingFaceSpider)
    response = TextResponse("https://huggingface.co/api/models", body=b"[]", encoding="utf-8",
                            headers={"Link": '<file:///etc/shadow>; rel="next"'},
                            request=Request("https://huggingface.co/api/models"))
    assert [r.url for r in hub.parse(response) if isinstance(r, Request)] == []


def test_scrapy_fetches_http_only(settings) -> None:
    handlers = scrapy_settings(settings)["DOWNLOAD_HANDLERS"]
    assert all(handlers[scheme] is None for scheme in ("file", "data", "s3", "ftp"))
