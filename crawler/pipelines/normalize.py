"""Normalise: raw source record → ``Expert`` fields via the pure functions of ``crawler.normalize``."""

from __future__ import annotations

import time

from crawler.items import SourceRecord
from crawler.normalize import normalize_civitai, normalize_huggingface
from crawler.pipelines.base import Stage


class NormalizePipeline(Stage):
    stage = "normalize"

    def process_item(self, item: SourceRecord) -> SourceRecord:
        start = time.perf_counter()
        try:
            if item.source == "civitai":
                fields, anomalies = normalize_civitai(item.model, item.version or {}, self.settings.civitai_api_url)
            elif item.source == "huggingface":
                fields, anomalies = normalize_huggingface(item.model, item.card, self.settings.hf_url)
            else:
                raise self.fail("unknown_source", item)
        except (TypeError, ValueError, AttributeError, KeyError) as exc:  # malformed record shapes
            raise self.fail("malformed_record", item, str(exc)[:200]) from exc
        finally:
            self.timed(time.perf_counter() - start)
        for name in anomalies:
            self.anomaly(name)
        item.fields = fields
        item.anomalies = anomalies
        return item
