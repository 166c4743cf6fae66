"""A Hub model-info response + its README model card → ``Expert`` fields (pure: no I/O)."""

from __future__ import annotations

import re
from typing import Any

import yaml

from core.types import ExpertKind
from crawler.normalize.base_model import normalize_base_model
from crawler.normalize.dates import parse_datetime
from crawler.normalize.files import normalize_hf_files
from crawler.normalize.hashing import hf_content_hash
from crawler.normalize.license import normalize_hf_license
from crawler.normalize.stats import normalize_stats
from crawler.normalize.text import clean_line, html_to_text
from crawler.normalize.words import normalize_tags, normalize_trained_words

MAX_FRONT_MATTER = 64_000
_FRONT = re.compile(r"\A---[ \t]*\r?\n(.*?)\r?\n---[ \t]*(?:\r?\n|\Z)", re.DOTALL)


def split_model_card(text: str | None) -> tuple[dict[str, Any], str]:
    """``(front matter, body)`` of a README model card; malformed YAML gives an empty mapping."""
    if not text:
        return {}, ""
    match = _FRONT.match(text)
    if not match or len(match.group(1)) > MAX_FRONT_MATTER:
        return {}, text
    try:
        data = yaml.safe_load(match.group(1))  # safe_load: no object construction from untrusted YAML
    except yaml.YAMLError:
        data = None
    return (data if isinstance(data, dict) else {}), text[match.end() :]


def _first_str(value: object) -> str:
    if isinstance(value, list):
        value = next((v for v in value if isinstance(v, str)), "")
    return value if isinstance(value, str) else ""


def _card_base_model(card: dict[str, Any], tags: list[str]) -> str:
    raw = _first_str(card.get("base_model"))
    if not raw:
        raw = next((t.split(":", 1)[1] for t in tags if t.startswith("base_model:") and t.count(":") == 1), "")
        raw = raw or next((t.rsplit(":", 1)[1] for t in tags if t.startswith("base_model:")), "")
    return raw


def normalize_huggingface(info: dict[str, Any], card_text: str | None, hf_url: str) -> tuple[dict[str, Any], list[str]]:
    """Expert fields of one Hub repo and the anomalies met.

    The card's YAML front matter (``base_model``, ``instance_prompt``, ``tags``, ``widget``, ``license``)
    overrides ``cardData`` from the API when both exist; the card body (Markdown) is the description.
    """
    anomalies: list[str] = []
    repo_id = str(info.get("id") or info.get("modelId") or "")
    raw_tags = [t for t in info.get("tags") or [] if isinstance(t, str)]
    front, body = split_model_card(card_text)
    card = {**(info.get("cardData") if isinstance(info.get("cardData"), dict) else {}), **front}
    base_raw = _card_base_model(card, raw_tags)
    family, known = normalize_base_model(base_raw)
    if not known:
        anomalies.append("unknown_base_model")
    tag_source = [*(card.get("tags") if isinstance(card.get("tags"), list) else []), *raw_tags]
    tags = normalize_tags(tag_source, hub=True)
    words = normalize_trained_words(card.get("instance_prompt"))
    widget = card.get("widget") if isinstance(card.get("widget"), list) else []
    prompts = [w.get("text") for w in widget if isinstance(w, dict) and isinstance(w.get("text"), str)]
    is_lora = "lora" in {t.lower() for t in tag_source if isinstance(t, str)}
    files = normalize_hf_files(info.get("siblings"), hf_url, repo_id, str(info.get("sha") or "main"))
    if is_lora or any(f.name == "pytorch_lora_weights.safetensors" for f in files):
        kind = ExpertKind.lora
    else:
        kind = ExpertKind.checkpoint
    description = html_to_text(body)
    if prompts and not description:
        description = "Example prompts: " + "; ".join(clean_line(p, 200) for p in prompts[:5])
    lic = normalize_hf_license(card, raw_tags)
    pop = normalize_stats({"downloads": info.get("downloads"), "likes": info.get("likes")})
    fields: dict[str, Any] = {
        "id": f"huggingface:{repo_id}",
        "source": "huggingface",
        "source_model_id": repo_id,
        "source_version_id": repo_id,
        "name": clean_line(repo_id.split("/")[-1], 512),
        "version_name": clean_line(info.get("sha") or "", 64),
        "kind": kind,
        "base_model": clean_line(base_raw, 128),
        "base_family": family,
        "family_known": known,
        "url": f"{hf_url.rstrip('/')}/{repo_id}",
        "description": description,
        "trained_words": words,
        "tags": tags,
        "creator": clean_line(info.get("author") or repo_id.split("/")[0], 512),
        "nsfw": "not-for-all-audiences" in raw_tags,
        "nsfw_level": 0,
        "license": lic.license,
        "downloads": pop.downloads,
        "likes": pop.likes,
        "popularity": pop.popularity,
        "files": files,
        "content_hash": hf_content_hash(info),
        "created_at": parse_datetime(info.get("createdAt")),
        "updated_at": parse_datetime(info.get("lastModified")),
    }
    return fields, anomalies
