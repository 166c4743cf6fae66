"""Ingestion: Scrapy spiders for Civitai and Hugging Face, item pipelines (validate, dedupe, register,
graph upsert, SQL records, calibration hook), the content-addressed safe download store, scheduled crawls."""
