"""Validate: build the pydantic ``Expert`` and apply policy (supported kind, a weight file, nsfw)."""

from __future__ import annotations

import time

from pydantic import ValidationError

from core.types import Expert
from crawler.items import SourceRecord
from crawler.pipelines.base import Stage


class ValidatePipeline(Stage):
    stage = "validate"

    def process_item(self, item: SourceRecord) -> SourceRecord:
        start = time.perf_counter()
        try:
            fields = item.fields or {}
            if fields.get("kind") is None:
                raise self.skip("unsupported_type", item)
            if not fields.get("name"):
                raise self.fail("missing_name", item)
            if not fields.get("files"):
                raise self.skip("no_weight_file", item)
            if fields.get("nsfw") and not self.settings.allow_nsfw:
                raise self.skip("nsfw", item)
            try:
                item.expert = Expert(**fields)
            except ValidationError as exc:
                first = exc.errors()[0]
                where = ".".join(str(p) for p in first.get("loc", ()))
                raise self.fail("invalid_record", item, f"{where}: {first.get('msg')}") from exc
        finally:
            self.timed(time.perf_counter() - start)
        return item
