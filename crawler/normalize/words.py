"""Trained (trigger) words and tags."""

from __future__ import annotations

from collections.abc import Iterable

from crawler.normalize.text import clean_line

MAX_ITEMS = 64
MAX_WORD = 200
MAX_TAG = 64

# Hub bookkeeping tags that say nothing about what an expert can draw.
_HF_SYSTEM_PREFIXES = ("license:", "base_model:", "arxiv:", "region:", "diffusers:", "template:", "dataset:", "doi:")
_HF_SYSTEM_TAGS = {
    "diffusers", "safetensors", "autotrain_compatible", "endpoints_compatible", "has_space", "inference",
    "text-to-image", "stable-diffusion", "stable-diffusion-diffusers", "diffusers-training", "lora", "pytorch",
    "stable-diffusion-xl", "stable-diffusion-xl-diffusers", "dreambooth", "not-for-all-audiences", "en",
}


def _unique(values: Iterable[str], limit: int = MAX_ITEMS) -> list[str]:
    out: list[str] = []
    seen: set[str] = set()
    for v in values:
        key = v.lower()
        if v and key not in seen:
            seen.add(key)
            out.append(v)
            if len(out) >= limit:
                break
    return out


def normalize_trained_words(raw: object) -> list[str]:
    """Trigger words: strings only, trimmed, de-duplicated (case-insensitive), bounded."""
    if isinstance(raw, str):
        raw = [raw]
    if not isinstance(raw, list):
        return []
    words = []
    for item in raw:
        if isinstance(item, str):
            words.append(clean_line(item, MAX_WORD).strip(" ,"))
    return _unique(words)


def normalize_tags(raw: object, hub: bool = False) -> list[str]:
    """Lower-case tags from strings or ``{"name": ...}`` objects; Hub system tags dropped when ``hub``."""
    if not isinstance(raw, list):
        return []
    tags = []
    for item in raw:
        name = item.get("name") if isinstance(item, dict) else item
        if not isinstance(name, str):
            continue
        tag = clean_line(name, MAX_TAG).lower()
        if hub and (tag in _HF_SYSTEM_TAGS or tag.startswith(_HF_SYSTEM_PREFIXES)):
            continue
        tags.append(tag)
    return _unique(tags)
