"""Hybrid search: one result per model, showcase evidence, bad input, ``<lora:…>`` tags in ESA."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from core.types import Expert, ExpertFile, ExpertKind
from deploy.cli import app
from graphdb.store import store_session
from planner import make_plan
from planner.retrieval import search_groups
from tests.planner.graphs import build_themed_graph

runner = CliRunner()


def _lora(eid: str, model: str, name: str, skill: str, vec, **extra: object) -> Expert:
    return Expert(
        id=eid, source="civitai", source_model_id=model, source_version_id=eid.split(":")[1], name=name,
        kind=ExpertKind.lora, base_family="sd15", skill=skill, embedding=[float(x) for x in vec], **extra,
    )  # fmt: skip


@pytest.fixture
def graph(settings, embedder) -> list[Expert]:
    build_themed_graph(settings, embedder)
    skills = ["hairstyles collection: braids, buns, ponytails", "hairstyles collection, version two", "animals"]
    v = embedder.encode(skills)
    extra = [
        _lora("civitai:301", "30", "Hairstyles Collection", skills[0], v[0], version_name="v1",
              files=[ExpertFile(name="hairCollection_v1.safetensors")]),
        _lora("civitai:302", "30", "Hairstyles Collection", skills[1], v[1], version_name="v2",
              files=[ExpertFile(name="hairCollection_v2.safetensors")]),
        # the rare word is only in a showcase prompt: lexical evidence the embedding text does not carry
        _lora("civitai:401", "40", "Woodland Friends", skills[2], v[2],
              showcase_prompts=["a red fox under a zorblax aurora, snowy forest"]),
    ]  # fmt: skip
    with store_session(settings) as store:
        store.upsert_experts(extra)
    return extra


def test_one_result_per_model_with_its_versions(settings, graph) -> None:
    result = runner.invoke(app, ["experts", "search", "hairstyles collection braids", "--kind", "lora", "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    ids = [r["expert_id"] for r in rows]
    assert ids[0] in {"civitai:301", "civitai:302"} and not {"civitai:301", "civitai:302"} <= set(ids)
    assert [v["expert_id"] for v in rows[0]["versions"]] == sorted({"civitai:301", "civitai:302"} - {ids[0]})
    assert len(ids) == len({r["source_id"] for r in rows})  # one row per model

    every = runner.invoke(
        app, ["experts", "search", "hairstyles collection braids", "--kind", "lora", "--json", "--all-versions"]
    )
    rows = json.loads(every.stdout)
    assert {"civitai:301", "civitai:302"} <= {r["expert_id"] for r in rows[:2]}
    assert all(r["versions"] == [] for r in rows)


def test_showcase_prompts_are_lexical_evidence(settings, graph) -> None:
    (ranking,) = search_groups(settings, ["zorblax aurora"], kind="lora", k=3)
    assert ranking[0][0].expert.id == "civitai:401"


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("", "prompt is empty"),
        ("   ", "prompt is empty"),
        ("x" * 10_001, "prompt is too long"),
        ("masterpiece, (best quality:1.2), 8k <lora:a:1>", "only quality boilerplate"),
    ],
)
def test_bad_queries_get_one_line(settings, graph, query: str, message: str) -> None:
    result = runner.invoke(app, ["experts", "search", query, "--json"])
    assert result.exit_code == 1 and result.stdout == ""
    assert message in result.output and len(result.output.strip().splitlines()) == 1


def test_queries_file_errors_name_the_line(settings, graph, tmp_path) -> None:
    queries = tmp_path / "queries.txt"
    queries.write_text("cute kittens\n\n   \nmasterpiece, best quality\nfoxes\n", encoding="utf-8")
    result = runner.invoke(app, ["experts", "search", "--queries-file", str(queries)])
    assert result.exit_code == 1 and result.stdout == ""
    assert f"{queries}:4:" in result.output and "boilerplate" in result.output
    blank = tmp_path / "blank.txt"
    blank.write_text("\n  \n", encoding="utf-8")
    result = runner.invoke(app, ["experts", "search", "--queries-file", str(blank)])
    assert result.exit_code == 1 and "no queries" in result.output


def test_lora_tags_select_known_experts_in_esa(settings, graph) -> None:
    lmax = settings.lora_max_weight
    plan = make_plan(
        settings,
        "cute kittens with braids <lora:hairCollection_v1:9> <lora:Woodland Friends:0.4> <lora:nosuch:0.5>",
        method="similarity",
    )
    by_id = {p.expert_id: p for p in plan.loras}
    assert by_id["civitai:301"].coefficient == pytest.approx(lmax)  # clamped to lora_max_weight
    assert by_id["civitai:401"].coefficient == pytest.approx(min(0.4, lmax))
    assert all(by_id[i].reason.startswith("prompt_tag") for i in ("civitai:301", "civitai:401"))
    assert "civitai:302" not in by_id  # one version per model
    assert len(plan.loras) <= max(settings.k_lora, 2)
    assert any("nosuch" in n and "ignored" in n for n in plan.notes)


def test_pair_evidence_is_the_cosines_and_the_trigger_hit(embedder) -> None:
    """What the VGAE decoder reads per (expert, prompt): computed by ESA's own Query for any prompt."""
    import numpy as np

    from planner.parse import parse_offline
    from planner.retrieval import Query

    skill = embedder.encode(["neon pink glowing colours"])[0] * 3.0  # not unit length: the cosine normalises
    neon = Expert(id="local:neon", source="local", name="Neon", kind=ExpertKind.lora, base_family="sd15",
                  skill="neon", embedding=[float(x) for x in skill], trained_words=["neonpink style", "style"])
    for text, hit in (("a heart in neonpink style on stripes", 1.0), ("a pink heart, flat style", 0.0)):
        query = Query.build(embedder, text, parse_offline(text))
        cos_prompt, cos_term, got = query.pair_features(neon)
        unit = skill / np.linalg.norm(skill)
        assert got == hit  # "style" alone is too generic a trained word to count (graphdb.search)
        assert cos_prompt == pytest.approx(float(query.prompt_vec @ unit), abs=1e-5)
        assert cos_term == pytest.approx(float((query.term_vecs @ unit).max()), abs=1e-5)
    no_embedding = neon.model_copy(update={"embedding": None})
    assert Query.build(embedder, "x neonpink style", parse_offline("x")).pair_features(no_embedding) == [0.0, 0.0, 1.0]
