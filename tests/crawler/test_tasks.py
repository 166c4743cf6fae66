"""The Celery task ``crawler.ingest`` (executed eagerly: it still runs the spider in a child process)."""

from __future__ import annotations

import pytest

from core.settings import get_settings
from crawler.run import CrawlError
from crawler.state import get_state
from crawler.tasks import ingest
from crawler.testing import CivitaiFixtureServer, civitai_item_for


def test_ingest_task_crawls_in_a_child_and_records_state(settings, weights, monkeypatch) -> None:
    items = [civitai_item_for(weights(f"t{i}.safetensors", seed=60 + i), name=f"Task {i}") for i in range(3)]
    with CivitaiFixtureServer(items) as server:
        monkeypatch.setenv("DIFFGRAPH_CIVITAI_API_URL", server.api_url)
        get_settings.cache_clear()
        result = ingest.apply(args=("civitai",), kwargs={"limit": 2}).get()
    assert (result["new"], result["failed"]) == (2, 0)
    state = get_state(get_settings(), "civitai")
    assert state["runs"] == 1 and state["total_new"] == 2 and state["last_error"] is None
    assert ingest.name == "crawler.ingest" and ingest.acks_late


def test_ingest_rejects_unknown_source(settings) -> None:
    with pytest.raises(CrawlError, match="unknown source"):
        ingest.apply(args=("myspace",)).get()
