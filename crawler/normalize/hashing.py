"""Content hashes of source records (change detection for incremental crawls)."""

from __future__ import annotations

import hashlib
import json

# Volatile fields: counters and example images change daily without the expert changing, and must not
# make a re-crawl see every version as "changed" (which would also re-trigger calibration).
_VOLATILE = {"stats", "images", "modelVersions", "rank", "covered", "downloads", "likes", "spaces", "trendingScore"}


def _stable(obj: object) -> object:
    if isinstance(obj, dict):
        return {k: _stable(v) for k, v in sorted(obj.items()) if k not in _VOLATILE}
    if isinstance(obj, list):
        return [_stable(v) for v in obj]
    return obj


def content_hash(*parts: object) -> str:
    """SHA-256 (hex) of the canonical JSON of ``parts`` without volatile fields."""
    blob = json.dumps([_stable(p) for p in parts], sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def civitai_content_hash(model: dict, version: dict) -> str:
    return content_hash(model, version)


def hf_content_hash(info: dict) -> str:
    """A Hub repo changes exactly when its commit ``sha`` (or ``lastModified``) does."""
    return content_hash({"id": info.get("id"), "sha": info.get("sha"), "lastModified": info.get("lastModified")})
