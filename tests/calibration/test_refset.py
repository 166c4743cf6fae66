"""The packaged reference set: size, coverage, provenance, content-derived version, rule consistency."""

from __future__ import annotations

import json
import re
from importlib import resources

from calibration.build_refset import RULES, Candidate, _eligible
from calibration.refset import content_version, load_reference_set


def _raw() -> dict:
    return json.loads(resources.files("calibration.data").joinpath("refset_v1.json").read_text())


def test_refset_has_enough_prompts_and_categories_with_provenance() -> None:
    refset = load_reference_set()
    assert len(refset.prompts) >= 64
    assert len(refset.categories) >= 12
    for required in ("portrait", "photoreal", "anime", "illustration", "landscape", "architecture", "animals",
                     "fantasy", "sci-fi", "product", "food", "abstract", "typography"):
        assert required in refset.categories
    assert len({p.id for p in refset.prompts}) == len(refset.prompts)
    assert len({p.text.lower() for p in refset.prompts}) == len(refset.prompts)
    for p in refset.prompts:
        assert p.text.strip() and p.set_version == refset.version
        assert re.search(r"(DiffusionDB|PartiPrompts).*row \d+", p.source), p.source
    datasets = {e["dataset"] for e in _raw()["prompts"]}
    assert datasets == {"diffusiondb", "partiprompts"}


def test_version_is_derived_from_content() -> None:
    raw = _raw()["prompts"]
    version = load_reference_set().version
    assert re.fullmatch(r"v1-[0-9a-f]{8}", version)
    assert content_version(raw) == version
    edited = [dict(raw[0], text=raw[0]["text"] + " at dusk"), *raw[1:]]
    assert content_version(edited) != version


def test_every_prompt_satisfies_its_category_rule() -> None:
    rules = {r.category: r for r in RULES}
    for e in _raw()["prompts"]:
        cand = Candidate(e["dataset"], e["file"], e["row"], e["source_id"], e["text"], e["parti_category"],
                         e["parti_challenge"])
        assert _eligible(rules[e["category"]], cand), e["id"]


def test_subset_spreads_over_categories() -> None:
    refset = load_reference_set()
    first = refset.subset(12)
    assert len(first) == 12 and len({p.category for p in first}) == 12
    assert refset.subset(None) == refset.prompts
