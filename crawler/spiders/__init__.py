"""Spiders: they only fetch and parse source pages into ``SourceRecord`` items (no side effects)."""

from crawler.spiders.civitai import CivitaiSpider
from crawler.spiders.huggingface import HuggingFaceSpider

SPIDERS = {"civitai": CivitaiSpider, "huggingface": HuggingFaceSpider}

__all__ = ["SPIDERS", "CivitaiSpider", "HuggingFaceSpider"]
