"""Item pipelines, one job per file, chained in ``crawler.settings.ITEM_PIPELINES``:
normalize → validate → dedupe → register → graph upsert → SQL records → enqueue calibration."""
