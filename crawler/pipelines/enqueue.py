"""Enqueue calibration for new or changed experts (after their SQL records are committed).

Without a broker ``core.queue.send`` is a no-op; the calibration sweep picks the experts up later.
"""

from __future__ import annotations

import logging

from core.queue import CALIBRATE_EXPERT, send
from crawler.items import SourceRecord
from crawler.pipelines.base import Stage

log = logging.getLogger(__name__)


class EnqueueCalibrationPipeline(Stage):
    stage = "enqueue"

    def process_item(self, item: SourceRecord) -> SourceRecord:
        if item.status in {"new", "updated"} and item.expert is not None:
            try:
                task_id = send(self.settings, CALIBRATE_EXPERT, (item.expert.id,))
            except Exception as exc:  # a broker outage must not lose the registered expert
                log.warning("could not enqueue calibration of %s: %s", item.expert.id, exc)
                self.anomaly("enqueue_failed")
            else:
                if task_id is not None:
                    self.stats.inc_value("diffgraph/enqueued")
        return item
