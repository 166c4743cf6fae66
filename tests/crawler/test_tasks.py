"""The Celery task ``crawler.ingest`` (executed eagerly: it still runs the spider in a child process)."""

from __future__ import annotations

import json

import pytest

from core.settings import get_settings
from crawler.run import CrawlError
from crawler.state import get_state
from crawler.tasks import ingest
from tests.fakes.servers import CivitaiFixtureServer, civitai_item_for


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


def test_a_scheduled_crawl_skips_while_its_source_is_locked(settings, weights, monkeypatch) -> None:
    import redis

    from crawler.tasks import crawl_lock
    from tests.conftest import REDIS_URL

    url = f"{REDIS_URL}/13"
    items = [civitai_item_for(weights("l.safetensors", seed=70), name="Locked")]
    with CivitaiFixtureServer(items) as server:
        monkeypatch.setenv("DIFFGRAPH_CIVITAI_API_URL", server.api_url)
        monkeypatch.setenv("DIFFGRAPH_BROKER_URL", url)
        get_settings.cache_clear()
        cfg = get_settings()
        redis.Redis.from_url(url).delete("diffgraph:crawl-lock:civitai")
        running = crawl_lock(cfg, "civitai")  # a slow crawl of the previous beat still holds it
        assert running.acquire(blocking=False)
        ttl = redis.Redis.from_url(url).ttl("diffgraph:crawl-lock:civitai")
        assert cfg.crawl_timeout_s < ttl <= cfg.crawl_timeout_s + 600  # expires shortly after the timeout
        result = ingest.apply(args=("civitai",)).get()
        assert result == {"source": "civitai", "skipped": "already_running"} and server.requests == []
        running.release()
        result = ingest.apply(args=("civitai",)).get()
        assert result["new"] == 1
        assert not redis.Redis.from_url(url).exists("diffgraph:crawl-lock:civitai")  # released after the run


def test_beat_crawls_expire_after_one_interval(settings) -> None:
    from deploy.celery_app import make_app

    schedule = make_app(settings.model_copy(update={"crawl_interval_s": 1800})).conf.beat_schedule
    for source in ("civitai", "huggingface"):
        assert schedule[f"ingest-{source}"]["options"]["expires"] == 1800


def test_a_crawl_child_past_its_timeout_is_stopped_and_leaves_its_resume_point(settings, caplog) -> None:
    import logging
    import socket
    import threading

    from crawler.run import crawl

    stopping = threading.Event()

    class OnStop(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "ran past" in record.getMessage():
                stopping.set()

    def answer_nothing() -> None:  # the crawl hangs on its first page until it is being stopped
        conns.append(hole.accept()[0])
        stopping.wait(120)
        conns[0].close()  # rather than letting the stopping crawl wait out its 60 s download timeout

    hole = socket.socket()
    hole.bind(("127.0.0.1", 0))
    hole.listen(8)
    conns: list[socket.socket] = []
    threading.Thread(target=answer_nothing, daemon=True).start()
    on_stop = OnStop()
    logging.getLogger("crawler.run").addHandler(on_stop)
    api = f"http://127.0.0.1:{hole.getsockname()[1]}/api/v1"
    cfg = settings.model_copy(update={"civitai_api_url": api, "crawl_timeout_s": 15, "log_level": "INFO"})
    caplog.set_level(logging.INFO)
    try:
        summary = crawl(cfg, "civitai", subprocess=True)
    finally:
        logging.getLogger("crawler.run").removeHandler(on_stop)
        hole.close()
    assert conns, "the child never reached its first page"
    assert summary.error and "DIFFGRAPH_CRAWL_TIMEOUT_S" in summary.error
    cursor = json.loads(get_state(cfg, "civitai")["cursor"])  # the page it was on, for the next run
    assert cursor["url"].startswith(f"{api}/models?")
    relayed = {(r.levelname, r.name.split(".")[2]) for r in caplog.records if r.name.startswith("crawler.child.")}
    assert ("INFO", "civitai") in relayed  # the child's own INFO lines reach this process's log as INFO
    assert any(r.levelname == "WARNING" and "ran past" in r.getMessage() for r in caplog.records)


def test_an_ingest_that_fetched_nothing_is_retried_and_recorded_once(settings, monkeypatch) -> None:
    with CivitaiFixtureServer([]) as server:
        server.fail("/models", ("status", 403))
        monkeypatch.setenv("DIFFGRAPH_CIVITAI_API_URL", server.api_url)
        get_settings.cache_clear()
        result = ingest.apply(args=("civitai",))  # eager: the retry runs at once, and finds the listing
        assert result.state == "SUCCESS" and server.count("/models?") == 2
    state = get_state(get_settings(), "civitai")
    assert state["runs"] == 2 and state["total_failed"] == 1  # each run recorded once, by its child
