"""Crawl bookkeeping: transient failures are remembered for the next run, a bounded number of times."""

from __future__ import annotations

from scrapy.utils.test import get_crawler

from core.records import CrawlItem, session_scope
from crawler.items import SourceRecord
from crawler.pipelines.base import BatchStage, Failed
from crawler.settings import scrapy_settings
from crawler.state import MAX_ATTEMPTS, known_hashes, remember_failures, retry_ids
from crawler.stats import RETRY


def test_failures_are_retried_until_the_attempt_cap(settings) -> None:
    with session_scope(settings) as s:
        s.add(CrawlItem(source="civitai", version_id="1", expert_id="civitai:1", content_hash="h1"))
        s.add(CrawlItem(source="civitai", version_id="2", expert_id="civitai:2", content_hash="h2",
                        status="quarantined", reason="nsfw: x"))
    remember_failures(settings, "civitai", {"1": "graph_error: locked", "2": "page_error", "3": "page_error"})
    # the registered and the quarantined version keep their records; only the unknown one is queued
    assert retry_ids(settings, "civitai") == ["3"]
    assert known_hashes(settings, "civitai") == {"1": "h1", "2": "h2", "3": ""}
    assert retry_ids(settings, "huggingface") == []
    for _ in range(MAX_ATTEMPTS - 1):
        remember_failures(settings, "civitai", {"3": "page_error: 503"})
    with session_scope(settings) as s:
        row = s.get(CrawlItem, ("civitai", "3"))
        assert (row.status, row.attempts, row.reason) == ("failed", MAX_ATTEMPTS, "page_error: 503")
    assert retry_ids(settings, "civitai") == []  # left for a person to look at


class _Broken(BatchStage):
    stage = "graph"

    def flush(self, items):
        raise RuntimeError("the embedded graph at /x is locked by another process")


def test_a_failing_batch_stage_queues_its_items_for_the_next_run(settings) -> None:
    crawler = get_crawler(settings_dict=scrapy_settings(settings))
    stage = _Broken.from_crawler(crawler)
    items = [SourceRecord(source="civitai", version_id=v, model={}, version={}) for v in ("7", "8")]
    outcomes = stage._flush_batch(items)  # what the stage's worker thread runs for a batch
    assert all(isinstance(o, Failed) for o in outcomes)
    retry = crawler.stats.get_value(RETRY)
    assert set(retry) == {"7", "8"} and retry["7"].startswith("graph_error: the embedded graph")
    assert crawler.stats.get_value("diffgraph/failed/graph_error") == 2


