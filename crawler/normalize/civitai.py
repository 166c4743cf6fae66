"""A Civitai model + one of its versions → ``Expert`` fields (pure: no I/O)."""

from __future__ import annotations

from typing import Any

from core.prompt_syntax import clean_query
from core.types import MAX_SHOWCASE_CHARS, MAX_SHOWCASE_PROMPTS
from crawler.normalize.base_model import normalize_base_model
from crawler.normalize.dates import parse_datetime
from crawler.normalize.files import normalize_civitai_files
from crawler.normalize.hashing import civitai_content_hash
from crawler.normalize.kind import normalize_kind
from crawler.normalize.license import normalize_civitai_license
from crawler.normalize.stats import normalize_stats
from crawler.normalize.text import DESCRIPTION_CAP, clean_line, html_to_text
from crawler.normalize.words import normalize_tags, normalize_trained_words

# Civitai nsfwLevel is a bit mask of the levels seen on the model's images: 1 PG, 2 PG-13, 4 R, 8 X, 16 XXX.
NSFW_EXPLICIT_BITS = 8 | 16


def site_url(api_url: str) -> str:
    """``https://civitai.com/api/v1`` → ``https://civitai.com`` (where model pages live)."""
    base = api_url.rstrip("/")
    return base[: -len("/api/v1")] if base.endswith("/api/v1") else base


def _level(value: object) -> int:
    return value if isinstance(value, int) and value >= 0 else 0


def showcase_prompts(version: dict[str, Any]) -> list[str]:
    """Up to ``MAX_SHOWCASE_PROMPTS`` distinct cleaned prompts of the version's showcase images (their
    ``meta.prompt``), in page order: markup, ``<lora:…>`` tags and boilerplate removed, one line, bounded."""
    images = version.get("images")
    out: dict[str, None] = {}
    for image in images[:100] if isinstance(images, list) else []:
        meta = image.get("meta") if isinstance(image, dict) else None
        prompt = meta.get("prompt") if isinstance(meta, dict) else None
        if not isinstance(prompt, str):
            continue
        text = clean_line(clean_query(clean_line(prompt, 4 * MAX_SHOWCASE_CHARS)), MAX_SHOWCASE_CHARS)
        if len(text) >= 3:
            out.setdefault(text, None)
        if len(out) >= MAX_SHOWCASE_PROMPTS:
            break
    return list(out)


def normalize_civitai(model: dict[str, Any], version: dict[str, Any], api_url: str) -> tuple[dict[str, Any], list[str]]:
    """Expert fields of one version and the anomalies met (names for crawl stats).

    ``nsfw`` is the model's own flag or an explicit (X/XXX) bit in the model's or version's ``nsfwLevel``;
    the raw level is kept in ``nsfw_level``.
    """
    anomalies: list[str] = []
    model_id, version_id = model.get("id"), version.get("id")
    kind = normalize_kind(model.get("type"))
    family, known = normalize_base_model(version.get("baseModel"))
    if not known:
        anomalies.append("unknown_base_model")
    files, bad_files = normalize_civitai_files(version.get("files"))
    if bad_files:
        anomalies.append("malformed_file")
    if files and not any(f.sha256 for f in files):
        anomalies.append("no_sha256")
    description = html_to_text(model.get("description"))
    version_text = html_to_text(version.get("description"), cap=2000)
    if version_text and version_text not in description:
        description = f"{description}\n\n{version_text}".strip()[:DESCRIPTION_CAP]
    creator = model.get("creator") if isinstance(model.get("creator"), dict) else {}
    level = _level(model.get("nsfwLevel")) | _level(version.get("nsfwLevel"))
    lic = normalize_civitai_license(model)
    pop = normalize_stats(version.get("stats") or model.get("stats"))
    settings = version.get("settings") if isinstance(version.get("settings"), dict) else {}
    strength = settings.get("strength")
    fields: dict[str, Any] = {
        "id": f"civitai:{version_id}",
        "source": "civitai",
        "source_model_id": str(model_id),
        "source_version_id": str(version_id),
        "name": clean_line(model.get("name"), 512),
        "version_name": clean_line(version.get("name"), 512),
        "kind": kind,
        "base_model": clean_line(version.get("baseModel"), 128),
        "base_family": family,
        "family_known": known,
        "url": f"{site_url(api_url)}/models/{model_id}?modelVersionId={version_id}",
        "description": description,
        "trained_words": normalize_trained_words(version.get("trainedWords")),
        "tags": normalize_tags(model.get("tags")),
        "showcase_prompts": showcase_prompts(version),
        "creator": clean_line(creator.get("username"), 512),
        "nsfw": bool(model.get("nsfw")) or bool(level & NSFW_EXPLICIT_BITS),
        "nsfw_level": level,
        "license": lic.license,
        "allow_commercial_use": lic.allow_commercial_use,
        "allow_derivatives": lic.allow_derivatives,
        "allow_no_credit": lic.allow_no_credit,
        "downloads": pop.downloads,
        "likes": pop.likes,
        "rating": pop.rating,
        "popularity": pop.popularity,
        "recommended_weight": float(strength) if isinstance(strength, int | float) else None,
        "files": files,
        "content_hash": civitai_content_hash(model, version),
        "created_at": parse_datetime(version.get("createdAt")),
        "updated_at": parse_datetime(version.get("updatedAt") or version.get("publishedAt")),
    }
    return fields, anomalies
