"""Retries through Scrapy's own ``RetryMiddleware`` (subclassed): network errors end to end in a real crawler
process, ``Retry-After`` pausing a whole host."""

from __future__ import annotations

import asyncio
import json
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import scrapy
from scrapy import Request
from scrapy.http import Response
from scrapy.utils.test import get_crawler

from crawler.middlewares import BackoffRetryMiddleware
from crawler.settings import scrapy_settings

ROOT = Path(__file__).resolve().parents[2]

# One spider fetching each URL given; the stats come back as JSON. Runs in a child: one reactor per process.
CHILD = """
import json, sys
import scrapy
from scrapy.crawler import CrawlerProcess
from core.settings import Settings
from crawler.settings import scrapy_settings

class Probe(scrapy.Spider):
    name = "probe"
    async def start(self):
        for url in sys.argv[1:]:
            yield scrapy.Request(url, callback=self.parse, errback=lambda f: None, dont_filter=True)
    def parse(self, response):
        return None

process = CrawlerProcess(scrapy_settings(Settings(), ITEM_PIPELINES={}, RETRY_BACKOFF_BASE=0.01, LOG_LEVEL="ERROR",
                                         DOWNLOAD_TIMEOUT=5))
crawler = process.create_crawler(Probe)
process.crawl(crawler)
process.start()
print(json.dumps(crawler.stats.get_stats(), default=str))
"""


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ResettingServer:
    """Accepts connections and resets them at once (RST), counting them."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.accepted = 0
        threading.Thread(target=self._serve, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.sock.getsockname()[1]}/page"

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            conn.close()

    def close(self) -> None:
        self.sock.close()


def test_network_errors_are_retried_by_scrapys_retry_middleware() -> None:
    reset = ResettingServer()
    try:
        proc = subprocess.run([sys.executable, "-c", CHILD, f"http://127.0.0.1:{_closed_port()}/x", reset.url],
                              cwd=ROOT, capture_output=True, text=True, timeout=120, check=False,
                              env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "HOME": "/tmp"})
        assert proc.returncode == 0, proc.stderr[-2000:]
        stats = json.loads(proc.stdout.strip().splitlines()[-1])
    finally:
        reset.close()
    times = scrapy_settings_retry_times()
    assert stats["downloader/request_count"] == 2 * (1 + times)  # both URLs: first try + every retry
    assert stats["retry/count"] == 2 * times and stats["retry/max_reached"] == 2
    assert any("ConnectionRefused" in k for k in stats if k.startswith("retry/reason_count/"))
    assert reset.accepted == 1 + times


def scrapy_settings_retry_times() -> int:
    from core.settings import Settings

    return int(scrapy_settings(Settings())["RETRY_TIMES"])


def test_retry_after_pauses_the_whole_host_capped_by_the_setting(settings) -> None:
    capped = settings.model_copy(update={"crawl_retry_after_max_s": 120})
    crawler = get_crawler(settings_dict=scrapy_settings(capped, RETRY_BACKOFF_BASE=0.0))
    crawler.spider = scrapy.Spider("probe")
    crawler.spider.crawler = crawler
    mw = BackoffRetryMiddleware.from_crawler(crawler)
    first = Request("https://api.example/models?page=1")
    limited = Response(first.url, status=429, headers={"Retry-After": "86400"}, request=first)

    async def scenario() -> None:
        retry = await mw.process_response(first, limited)
        assert isinstance(retry, Request) and retry.meta["retry_times"] == 1
        left = mw.paused_until["api.example"] - time.monotonic()
        assert 60 < left <= 120  # the day asked for is capped by the setting
        other_page = Request("https://api.example/models?page=7")  # never got a 429 itself
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(mw.process_request(other_page), 0.2)
        await asyncio.wait_for(mw.process_request(Request("https://elsewhere.example/x")), 0.2)

    asyncio.run(scenario())
    assert crawler.stats.get_value("diffgraph/retry_after_pauses") == 1
