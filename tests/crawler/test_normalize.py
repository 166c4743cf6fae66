"""Pure normalisers on the real Civitai / Hub fixtures."""

from __future__ import annotations

import json

import pytest

from core.types import Expert, ExpertFile, ExpertKind
from crawler.normalize import (
    civitai_content_hash,
    html_to_text,
    normalize_base_model,
    normalize_civitai,
    normalize_huggingface,
    normalize_kind,
    normalize_stats,
    normalize_tags,
    normalize_trained_words,
    select_primary,
    split_model_card,
)
from crawler.normalize.text import DESCRIPTION_CAP

from .conftest import HF, civitai_items, load_json

API = "https://civitai.com/api/v1"


@pytest.mark.parametrize(
    ("raw", "family", "known"),
    [
        ("SD 1.5", "sd15", True),
        ("SD 1.4", "sd15", True),
        ("SD 2.0", "sd2", True),
        ("SD 2.1", "sd2", True),
        ("SD 2.1 768", "sd2", True),
        ("SDXL 1.0", "sdxl", True),
        ("Pony", "pony", True),
        ("Illustrious", "illustrious", True),
        ("Flux.1 D", "flux", True),
        ("Flux.1 S", "flux-schnell", True),
        ("runwayml/stable-diffusion-v1-5", "sd15", True),
        ("stabilityai/stable-diffusion-xl-base-1.0", "sdxl", True),
        ("black-forest-labs/FLUX.1-dev", "flux", True),
        ("Other", "Other", False),
        ("Hunyuan 1", "Hunyuan 1", False),
        ("", "unknown", False),
    ],
)
def test_base_model_families(raw: str, family: str, known: bool) -> None:
    assert normalize_base_model(raw) == (family, known)


def test_kinds() -> None:
    assert normalize_kind("LORA") is ExpertKind.lora
    assert normalize_kind("LoCon") is ExpertKind.locon
    assert normalize_kind("Checkpoint") is ExpertKind.checkpoint
    assert normalize_kind("TextualInversion") is ExpertKind.embedding
    assert normalize_kind("VAE") is None


def test_html_is_stripped_of_scripts_and_capped() -> None:
    html = (
        "<p>Great <b>anime</b> style&nbsp;&amp; colours.</p><script>alert('x'); fetch('/steal')</script>"
        "<style>p{color:red}</style><iframe src='https://evil'>inner</iframe><p>Second.</p>"
    )
    text = html_to_text(html)
    assert text == "Great anime style & colours.\n\nSecond."
    huge = "<p>" + ("word " * 250_000) + "</p>"  # ~1.25 MB
    capped = html_to_text(huge)
    assert len(capped) <= DESCRIPTION_CAP + 1 and capped.startswith("word word")


def test_trained_words_and_tags() -> None:
    assert normalize_trained_words(["  ppstorybook ", "PPSTORYBOOK", "", 7, "a, b,"]) == ["ppstorybook", "a, b"]
    assert normalize_tags([{"name": "Anime"}, "anime", "Style", None]) == ["anime", "style"]
    hub = ["diffusers", "lora", "base_model:runwayml/stable-diffusion-v1-5", "license:mit", "pokemon"]
    assert normalize_tags(hub, hub=True) == ["pokemon"]


def test_all_real_civitai_items_become_valid_experts() -> None:
    count = 0
    for model in civitai_items():
        for version in model["modelVersions"]:
            fields, _ = normalize_civitai(model, version, API)
            expert = Expert(**fields)
            count += 1
            assert expert.id == f"civitai:{version['id']}"
            assert expert.kind in {ExpertKind.lora, ExpertKind.checkpoint}
            primary = expert.primary_file
            assert primary is not None and primary.primary
            if any(f.format == "SafeTensor" for f in expert.files):
                assert primary.format == "SafeTensor"
            assert all(f.sha256 is None or len(f.sha256) == 64 and f.sha256 == f.sha256.lower() for f in expert.files)
            assert "<" not in expert.description or "<p>" not in expert.description
    assert count >= 30


def test_detail_tweaker_fields() -> None:
    model = civitai_items()[0]
    assert model["name"].startswith("Detail Tweaker")
    fields, anomalies = normalize_civitai(model, model["modelVersions"][0], API)
    e = Expert(**fields)
    assert (e.base_family, e.family_known, e.kind) == ("sd15", True, ExpertKind.lora)
    assert e.creator == "CyberAIchemist" and "detailed" in e.tags
    assert e.primary_file.sha256 == "47aaaf0d2945ca937151d61304946dd229b3f072140b85484bc93e38f2a6e2f7"
    assert e.primary_file.autov2 == "47AAAF0D29"
    assert e.url == "https://civitai.com/models/58390?modelVersionId=62833"
    assert 0 < e.popularity <= 1 and e.downloads == 129209
    assert e.allow_commercial_use == "None" and not e.nsfw and anomalies == []


def test_2025_illustrious_item() -> None:
    model = load_json("model_1580878.json")
    fields, _ = normalize_civitai(model, model["modelVersions"][0], API)
    e = Expert(**fields)
    assert (e.base_model, e.base_family) == ("Illustrious", "illustrious")
    assert e.allow_commercial_use == "Image,Rent,RentCivit,Sell"
    assert e.nsfw_level == 7 and e.nsfw is False  # PG|PG-13|R bits only: not explicit


def test_flux_model_by_id() -> None:
    model = load_json("civitai_api_model_by_modelId.json")
    fields, _ = normalize_civitai(model, model["modelVersions"][0], API)
    e = Expert(**fields)
    assert e.base_family == "flux" and e.trained_words == ["ppstorybook"]


def test_official_doc_checkpoint_example() -> None:
    model = load_json("models_1102.json")
    for version in model["modelVersions"]:
        fields, _ = normalize_civitai(model, version, API)
        assert Expert(**fields).kind is ExpertKind.checkpoint


def test_content_hash_ignores_volatile_stats() -> None:
    model = civitai_items()[1]
    version = model["modelVersions"][0]
    before = civitai_content_hash(model, version)
    bumped = json.loads(json.dumps(model))
    bumped["stats"]["downloadCount"] += 1000
    bumped["modelVersions"][0]["stats"]["downloadCount"] += 1000
    assert civitai_content_hash(bumped, bumped["modelVersions"][0]) == before
    bumped["modelVersions"][0]["trainedWords"] = ["changed"]
    assert civitai_content_hash(bumped, bumped["modelVersions"][0]) != before


def test_primary_prefers_safetensors() -> None:
    files = [
        ExpertFile(name="a.ckpt", format="PickleTensor", primary=True),
        ExpertFile(name="a.safetensors", format="SafeTensor", primary=False),
    ]
    chosen = [f.name for f in select_primary(files) if f.primary]
    assert chosen == ["a.safetensors"]


def test_stats_popularity_is_bounded() -> None:
    assert normalize_stats({"downloadCount": 10**9, "ratingCount": 5, "rating": 5}).popularity == 1.0
    assert normalize_stats({"downloadCount": -4, "rating": "bad"}).popularity == 0.0


def test_hub_info_and_cards() -> None:
    info = json.loads((HF / "api_models_stabilityai__stable-diffusion-2-1.json").read_text())
    fields, _ = normalize_huggingface(info, None, "https://huggingface.co")
    e = Expert(**fields)
    assert e.kind is ExpertKind.checkpoint and e.license == "openrail++"
    assert e.primary_file.name.endswith(".safetensors")
    card = (HF / "cards" / "HK200202-hub_emojii__fofr_sdxl-emoji__README.md").read_text()
    front, body = split_model_card(card)
    assert front["instance_prompt"] == "an <s0><s1> emoji" and body.lstrip().startswith("# sdxl-emoji")
    lora_info = {"id": "fofr/sdxl-emoji", "sha": "abc", "tags": ["lora"], "siblings": [
        {"rfilename": "lora.safetensors", "lfs": {"sha256": "a" * 64, "size": 10}}]}
    fields, _ = normalize_huggingface(lora_info, card, "https://huggingface.co")
    e = Expert(**fields)
    assert (e.kind, e.base_family, e.trained_words) == (ExpertKind.lora, "sdxl", ["an <s0><s1> emoji"])
    assert e.license == "creativeml-openrail-m" and e.primary_file.sha256 == "a" * 64


def test_every_fixture_card_parses() -> None:
    for path in sorted((HF / "cards").glob("*.md")):
        front, _ = split_model_card(path.read_text(encoding="utf-8"))
        fields, _ = normalize_huggingface({"id": f"x/{path.stem[:40]}", "sha": "1"}, path.read_text(), "http://h")
        Expert(**fields)
        assert isinstance(front, dict)


def test_showcase_prompts_are_cleaned_bounded_and_distinct() -> None:
    from core.types import MAX_SHOWCASE_CHARS, MAX_SHOWCASE_PROMPTS
    from crawler.normalize.civitai import showcase_prompts

    images = [
        {"id": 4, "meta": {"prompt": "masterpiece, best quality, (red fox:1.2), <lora:fox:0.8>, snow BREAK night"}},
        {"id": 8, "meta": {"prompt": "masterpiece, best quality, (red fox:1.2), snow, night"}},  # same once cleaned
        {"id": 12, "meta": None},
        {"id": 16, "meta": {"prompt": 42}},
        {"id": 20, "meta": {"prompt": "8k, absurdres"}},  # nothing left
        {"id": 24, "meta": {"prompt": "a castle\x00 " + "tower, " * 400}},
        *({"id": 28 + 4 * i, "meta": {"prompt": f"scene number {i}"}} for i in range(20)),
    ]
    out = showcase_prompts({"images": images})
    assert out[0] == "red fox, snow, night" and out[1].startswith("a castle tower, tower")
    assert len(out) == MAX_SHOWCASE_PROMPTS and all(len(p) <= MAX_SHOWCASE_CHARS for p in out)
    assert all("\x00" not in p and "<lora" not in p for p in out)
    assert showcase_prompts({"images": "not a list"}) == [] and showcase_prompts({}) == []
    fields, _ = normalize_civitai({"id": 1, "name": "m", "type": "LORA"}, {"id": 2, "images": images[:1]}, "http://x/api/v1")
    assert Expert(**fields).showcase_prompts == ["red fox, snow, night"]
