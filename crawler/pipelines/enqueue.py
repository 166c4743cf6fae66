"""Enqueue calibration for new or changed experts (after their SQL records are committed).

Without a broker ``core.queue.send`` is a no-op; the calibration sweep picks the experts up later. It also
picks up the experts this stage could not enqueue, so a broker outage never stalls the crawl: publishing
runs on this stage's worker thread (a down broker costs seconds of publish retries), and after one failed
publish the broker is skipped for ``BROKER_RESET_S``.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor

from core.queue import CALIBRATE_EXPERT, send
from crawler.breaker import breaker_for
from crawler.items import SourceRecord
from crawler.pipelines.base import Stage

log = logging.getLogger(__name__)
BROKER_RESET_S = 60.0


class EnqueueCalibrationPipeline(Stage):
    stage = "enqueue"

    def open_spider(self) -> None:
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="diffgraph-enqueue")
        self.breaker = breaker_for("broker", self.settings.broker_url, threshold=1, reset_s=BROKER_RESET_S)

    async def process_item(self, item: SourceRecord) -> SourceRecord:
        if item.status in {"new", "updated"} and item.expert is not None:
            if not self.breaker.allow():
                self.anomaly("enqueue_skipped")  # the calibration sweep enqueues it later
                return item
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(self.worker, self._send, item.expert.id)
        return item

    def _send(self, expert_id: str) -> None:
        if not self.breaker.allow():  # opened while this publish waited its turn
            self.anomaly("enqueue_skipped")
            return
        try:
            task_id = send(self.settings, CALIBRATE_EXPERT, (expert_id,))
        except Exception as exc:  # a broker outage must not lose the registered expert
            log.warning("could not enqueue calibration of %s: %s", expert_id, exc)
            self.anomaly("enqueue_failed")
            self.breaker.failure(exc)
        else:
            self.breaker.success()
            if task_id is not None:
                self.stats.inc_value("diffgraph/enqueued")

    def close_spider(self) -> None:
        self.worker.shutdown(wait=False)
