"""The ``GraphStore`` contract, run against every backend (see ``conftest.store``)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import numpy as np
import pytest

from core.types import Capability, NotFoundError, RefPrompt
from graphdb.store import NODE_LABELS, REL_TYPES, CandidateFilter, ExpertFilter, GraphError, GraphStore
from graphdb.subgraph import PROMPT_NODE_ID
from tests.graphdb.conftest import make_expert, unit

INJECTION = "x'}) DETACH DELETE n //"
T0 = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


def prompts(n: int = 3, version: str = "v1") -> list[RefPrompt]:
    return [
        RefPrompt(
            id=f"ref:{i}",
            category=f"cat{i % 2}",
            text=f"reference prompt {i}",
            set_version=version,
            embedding=unit(1000 + i),
        )
        for i in range(n)
    ]


def cap(expert_id: str, prompt_id: str, score: float, **kw) -> Capability:
    return Capability(expert_id=expert_id, prompt_id=prompt_id, score=score, calibrated_at=T0, **kw)


def test_store_satisfies_protocol_and_schema_is_idempotent(store):
    assert isinstance(store, GraphStore)
    store.ensure_schema()
    store.ensure_schema()
    stats = store.stats().to_json()
    assert list(stats) == ["nodes", "relationships"]
    assert set(stats["nodes"]) == set(NODE_LABELS)
    assert set(stats["relationships"]) == set(REL_TYPES)
    assert all(v == 0 for v in stats["nodes"].values())
    assert all(v == 0 for v in stats["relationships"].values())


# experts -----------------------------------------------------------------------------------------
def test_upsert_round_trips_every_field(store):
    expert = make_expert(
        "civitai:101",
        kind="locon",
        source_model_id="55",
        version_name="v2.0",
        base_model="SDXL 1.0",
        base_family="sdxl",
        family_known=True,
        url="https://civitai.com/models/55",
        description="Line one.\nLine two with 'quotes' and \"double\".",
        skill="anime line art",
        skills=["line art", "anime"],
        subjects=["girl"],
        styles=["anime"],
        trained_words=["lineart", "sketch"],
        tags=["anime", "lineart"],
        creator="bob",
        nsfw=True,
        nsfw_level=4,
        license="creativeml-openrail-m",
        allow_commercial_use="Image",
        allow_derivatives=False,
        allow_no_credit=False,
        downloads=1234,
        likes=56,
        rating=4.5,
        popularity=0.75,
        recommended_weight=0.8,
        created_at=T0,
        updated_at=T0 + timedelta(days=1),
        calibrated_at=T0 + timedelta(days=2),
        ref_set_version="v1",
        scorer_version="clip-1",
    )
    result = store.upsert_experts([expert])
    assert (result.created, result.updated, result.unchanged) == (1, 0, 0)
    assert result.created_ids == ("civitai:101",)
    got = store.get_expert("civitai:101")
    assert got.model_dump(exclude={"embedding"}) == expert.model_dump(exclude={"embedding"})
    assert np.allclose(got.embedding, expert.embedding, atol=1e-6)
    assert got.label == "LoRA"


def test_upsert_twice_is_idempotent(store):
    experts = [make_expert(f"civitai:{i}", tags=["anime", "style"]) for i in range(3)]
    first = store.upsert_experts(experts)
    before = store.stats().to_json()
    second = store.upsert_experts(experts)
    assert (first.created, first.updated, first.unchanged) == (3, 0, 0)
    assert (second.created, second.updated, second.unchanged) == (0, 0, 3)
    assert second.created_ids == () and second.updated_ids == ()
    assert store.stats().to_json() == before
    assert before["nodes"]["Expert"] == 3
    assert before["relationships"]["TAGGED"] == 6
    assert before["relationships"]["BASED_ON"] == 3
    assert before["relationships"]["CREATED_BY"] == 3


def test_duplicate_ids_in_one_batch_keep_the_last(store):
    result = store.upsert_experts(
        [make_expert("civitai:1", name="old"), make_expert("civitai:1", name="new")]
    )
    assert result.created == 1
    assert store.get_expert("civitai:1").name == "new"
    assert store.stats().nodes["Expert"] == 1


def test_changed_expert_replaces_links_and_needs_recalibration(store):
    store.upsert_experts([make_expert("civitai:1", tags=["anime", "girl"], creator="alice")])
    store.mark_calibrated("civitai:1", "v1", "clip-1", T0)
    changed = make_expert(
        "civitai:1", tags=["photo"], creator="bob", base_family="sdxl", content_hash="new-hash"
    )
    result = store.upsert_experts([changed])
    assert (result.created, result.updated, result.unchanged) == (0, 1, 0)
    assert result.updated_ids == ("civitai:1",)
    got = store.get_expert("civitai:1")
    assert got.tags == ["photo"] and got.creator == "bob"
    assert got.calibrated_at is None and got.ref_set_version == "" and got.scorer_version == ""
    stats = store.stats()
    assert stats.relationships["TAGGED"] == 1
    assert stats.relationships["CREATED_BY"] == 1
    assert stats.relationships["BASED_ON"] == 1
    assert [e.id for e in store.find_experts(ExpertFilter(tag="photo"))] == ["civitai:1"]
    assert store.find_experts(ExpertFilter(tag="anime")) == []
    assert [e.id for e in store.find_experts(ExpertFilter(base_family="sdxl"))] == ["civitai:1"]
    assert [e.id for e in store.find_experts(ExpertFilter(uncalibrated_for="v1"))] == ["civitai:1"]


def test_unchanged_expert_keeps_stored_calibration(store):
    store.upsert_experts([make_expert("civitai:1")])
    store.mark_calibrated("civitai:1", "v1", "clip-1", T0)
    result = store.upsert_experts([make_expert("civitai:1", popularity=0.9)])  # same content_hash
    assert result.unchanged == 1
    got = store.get_expert("civitai:1")
    assert (got.calibrated_at, got.ref_set_version, got.scorer_version) == (T0, "v1", "clip-1")
    # an incoming record that carries calibration fields sets them
    store.upsert_experts(
        [
            make_expert(
                "civitai:1",
                calibrated_at=T0 + timedelta(hours=1),
                ref_set_version="v2",
                scorer_version="clip-2",
            )
        ]
    )
    got = store.get_expert("civitai:1")
    assert (got.calibrated_at, got.ref_set_version, got.scorer_version) == (
        T0 + timedelta(hours=1),
        "v2",
        "clip-2",
    )


def test_empty_upsert_batch_is_a_no_op(store):
    result = store.upsert_experts([])
    assert (result.created, result.updated, result.unchanged) == (0, 0, 0)
    assert store.stats().nodes["Expert"] == 0


def test_injection_like_strings_are_stored_verbatim(store):
    weird_id = "civitai:1' OR '1'='1"
    expert = make_expert(
        weird_id,
        name=INJECTION,
        tags=[INJECTION, "ok"],
        creator=INJECTION,
        description="MATCH (n) DETACH DELETE n; // $param {x}",
        base_family="sd15",
    )
    other = make_expert("civitai:2")
    store.upsert_experts([expert, other])
    got = store.get_expert(weird_id)
    assert got.name == INJECTION and got.creator == INJECTION
    assert got.tags == [INJECTION, "ok"]
    assert got.description == "MATCH (n) DETACH DELETE n; // $param {x}"
    assert [e.id for e in store.find_experts(ExpertFilter(tag=INJECTION))] == [weird_id]
    assert [e.id for e in store.find_experts(ExpertFilter(creator=INJECTION))] == [weird_id]
    assert [e.id for e in store.find_experts(ExpertFilter(name_contains="detach delete"))] == [weird_id]
    store.upsert_ref_prompts([RefPrompt(id=INJECTION, category="c", text=INJECTION, embedding=unit(5))])
    store.write_capabilities([cap(weird_id, INJECTION, 0.5)])
    store.record_generation(INJECTION, INJECTION, [(weird_id, 0.5)])
    assert store.list_ref_prompts()[0].text == INJECTION
    stats = store.stats()
    assert stats.nodes["Expert"] == 2 and stats.nodes["Generation"] == 1
    assert stats.relationships["CAPABILITY"] == 1 and stats.relationships["USED"] == 1
    store.delete_expert(weird_id)
    assert store.get_expert("civitai:2").id == "civitai:2"


def test_get_and_delete_unknown_expert_raise_not_found(store):
    with pytest.raises(NotFoundError, match="civitai:404"):
        store.get_expert("civitai:404")
    with pytest.raises(NotFoundError, match="civitai:404"):
        store.delete_expert("civitai:404")
    with pytest.raises(NotFoundError, match="civitai:404"):
        store.mark_calibrated("civitai:404", "v1", "s", T0)


def test_delete_removes_the_expert_and_its_relationships(store):
    store.upsert_experts([make_expert("civitai:1", tags=["a", "b"]), make_expert("civitai:2")])
    store.upsert_ref_prompts(prompts(2))
    store.write_capabilities([cap("civitai:1", "ref:0", 0.4), cap("civitai:2", "ref:1", 0.6)])
    store.link_similar(k=1)
    store.record_generation("gen-1", "p", [("civitai:1", 0.5), ("civitai:2", 0.5)])
    store.delete_expert("civitai:1")
    with pytest.raises(NotFoundError):
        store.get_expert("civitai:1")
    stats = store.stats()
    assert stats.nodes["Expert"] == 1
    assert stats.relationships["CAPABILITY"] == 1
    assert stats.relationships["TAGGED"] == 1
    assert stats.relationships["SIMILAR_TO"] == 0
    assert stats.relationships["USED"] == 1
    assert [c.expert_id for c in store.get_capabilities()] == ["civitai:2"]


def test_find_experts_filters(store):
    store.upsert_experts(
        [
            make_expert(
                "civitai:1", kind="checkpoint", name="Realistic Vision", base_family="sd15", creator="sg"
            ),
            make_expert("civitai:2", kind="lora", name="Anime Lines", tags=["anime"], base_family="sd15"),
            make_expert("civitai:3", kind="loha", name="Watercolour", base_family="sdxl"),
            make_expert(
                "huggingface:user/repo", kind="lora", name="HF Anime", tags=["anime"], base_family="sdxl"
            ),
        ]
    )
    ids = lambda f, **kw: [e.id for e in store.find_experts(f, **kw)]  # noqa: E731
    assert ids(None) == ["civitai:1", "civitai:2", "civitai:3", "huggingface:user/repo"]
    assert ids(ExpertFilter(kind="checkpoint")) == ["civitai:1"]
    assert ids(ExpertFilter(kind="lora")) == ["civitai:2", "civitai:3", "huggingface:user/repo"]
    assert ids(ExpertFilter(base_family="sdxl")) == ["civitai:3", "huggingface:user/repo"]
    assert ids(ExpertFilter(source="huggingface")) == ["huggingface:user/repo"]
    assert ids(ExpertFilter(tag="anime", base_family="sd15")) == ["civitai:2"]
    assert ids(ExpertFilter(creator="sg")) == ["civitai:1"]
    assert ids(ExpertFilter(name_contains="anime")) == ["civitai:2", "huggingface:user/repo"]
    assert ids(None, limit=2) == ["civitai:1", "civitai:2"]
    store.mark_calibrated("civitai:1", "v1", "s", T0)
    store.mark_calibrated("civitai:2", "v0", "s", T0)
    assert ids(ExpertFilter(uncalibrated_for="v1")) == ["civitai:2", "civitai:3", "huggingface:user/repo"]


# reference prompts and capabilities ----------------------------------------------------------------
def test_ref_prompts_upsert_and_list(store):
    assert store.upsert_ref_prompts(prompts(3)) == 3
    assert store.upsert_ref_prompts(prompts(3)) == 3
    assert store.upsert_ref_prompts(prompts(1, version="v2")[:0]) == 0
    store.upsert_ref_prompts([RefPrompt(id="ref:9", category="x", text="other", set_version="v2")])
    listed = store.list_ref_prompts()
    assert [p.id for p in listed] == ["ref:0", "ref:1", "ref:2", "ref:9"]
    assert [p.id for p in store.list_ref_prompts("v2")] == ["ref:9"]
    assert listed[0].text == "reference prompt 0" and listed[0].category == "cat0"
    assert np.allclose(listed[0].embedding, unit(1000), atol=1e-6)
    assert store.stats().nodes["RefPrompt"] == 4


def test_capabilities_are_idempotent_and_last_calibration_wins(store):
    store.upsert_experts([make_expert("civitai:1"), make_expert("civitai:2")])
    store.upsert_ref_prompts(prompts(2))
    batch = [
        cap("civitai:1", "ref:0", 0.25, metrics={"clip_gain": 0.03, "aesthetic_gain": -0.1}, n_images=4),
        cap("civitai:1", "ref:1", 0.5),
        cap("civitai:2", "ref:0", 0.75),
    ]
    assert store.write_capabilities(batch) == 3
    assert store.write_capabilities(batch) == 3
    assert store.stats().relationships["CAPABILITY"] == 3
    later = cap("civitai:1", "ref:0", 0.9, metrics={"clip_gain": 0.2}, n_images=8, ref_set_version="v2")
    store.write_capabilities([later])
    assert store.stats().relationships["CAPABILITY"] == 3
    got = store.get_capabilities(expert_id="civitai:1", prompt_id="ref:0")
    assert len(got) == 1
    assert got[0].score == pytest.approx(0.9, abs=1e-6)
    assert got[0].metrics == pytest.approx({"clip_gain": 0.2})
    assert got[0].n_images == 8 and got[0].ref_set_version == "v2" and got[0].calibrated_at == T0
    assert [(c.expert_id, c.prompt_id) for c in store.get_capabilities(expert_id="civitai:1")] == [
        ("civitai:1", "ref:0"),
        ("civitai:1", "ref:1"),
    ]
    assert [c.expert_id for c in store.get_capabilities(prompt_id="ref:0")] == ["civitai:1", "civitai:2"]
    assert len(store.get_capabilities()) == 3
    assert store.write_capabilities([]) == 0


def test_capabilities_with_unknown_ids_write_nothing(store):
    store.upsert_experts([make_expert("civitai:1")])
    store.upsert_ref_prompts(prompts(1))
    with pytest.raises(NotFoundError, match="civitai:404"):
        store.write_capabilities([cap("civitai:1", "ref:0", 0.5), cap("civitai:404", "ref:0", 0.5)])
    with pytest.raises(NotFoundError, match="ref:404"):
        store.write_capabilities([cap("civitai:1", "ref:0", 0.5), cap("civitai:1", "ref:404", 0.5)])
    assert store.get_capabilities() == []
    assert store.stats().relationships["CAPABILITY"] == 0


# similarity and retrieval -----------------------------------------------------------------------
@pytest.fixture
def skilled(store, embedder):
    """Experts with real MiniLM embeddings of their skill descriptions."""
    skills = {
        "civitai:anime": ("lora", "sd15", "anime style illustration, manga characters, cel shading", {}),
        "civitai:photo": ("lora", "sd15", "photorealistic portrait photography, DSLR, natural skin", {}),
        "civitai:water": ("locon", "sd15", "watercolor landscape painting with soft washes", {}),
        "civitai:nsfwanime": (
            "lora",
            "sd15",
            "anime style illustration, manga characters, cel shading",
            {"nsfw": True},
        ),
        "civitai:xlanime": ("lora", "sdxl", "anime style illustration, manga characters", {}),
        "civitai:ckpt": (
            "checkpoint",
            "sd15",
            "general purpose realistic photography model",
            {"allow_commercial_use": "Sell", "allow_derivatives": True},
        ),
        "civitai:ckpt2": (
            "checkpoint",
            "sd15",
            "anime checkpoint for illustrations",
            {"allow_commercial_use": "None", "allow_derivatives": False},
        ),
    }
    vectors = embedder.encode([s for _, _, s, _ in skills.values()])
    experts = [
        make_expert(i, kind=kind, base_family=fam, skill=skill, embedding=vec.tolist(), **extra)
        for (i, (kind, fam, skill, extra)), vec in zip(skills.items(), vectors, strict=True)
    ]
    store.upsert_experts(experts)
    return store


def test_candidates_rank_by_relevance(skilled, embedder):
    query = embedder.encode(["an anime girl with big eyes, manga style"])[0]
    got = skilled.candidates(query, kind="lora", base_family="sd15", k=3)
    assert got[0].expert.id == "civitai:anime"
    assert all(c.expert.label == "LoRA" and c.expert.base_family == "sd15" for c in got)
    assert [c.score for c in got] == sorted((c.score for c in got), reverse=True)
    assert -1.0 <= got[-1].score <= got[0].score <= 1.0
    photo = skilled.candidates(embedder.encode(["a studio portrait photo of a man"])[0], kind="lora", k=1)
    assert [c.expert.id for c in photo] == ["civitai:photo"]


def test_candidate_filters(skilled, embedder):
    query = embedder.encode(["anime manga illustration"])[0]
    ids = lambda **kw: [c.expert.id for c in skilled.candidates(query, k=10, **kw)]  # noqa: E731
    assert "civitai:nsfwanime" not in ids()
    assert "civitai:nsfwanime" in ids(filters=CandidateFilter(allow_nsfw=True))
    assert "civitai:water" in ids(kind="lora")  # lora matches every adapter kind
    assert set(ids(kind="checkpoint")) == {"civitai:ckpt", "civitai:ckpt2"}
    assert ids(kind="checkpoint", filters=CandidateFilter(require_commercial_use=True)) == ["civitai:ckpt"]
    assert ids(kind="checkpoint", filters=CandidateFilter(require_derivatives=True)) == ["civitai:ckpt"]
    assert ids(kind="lora", base_family="sdxl") == ["civitai:xlanime"]
    assert ids(kind="lora", base_family="flux") == []
    excluded = ids(kind="lora", filters=CandidateFilter(exclude_ids=frozenset({"civitai:anime"})))
    assert "civitai:anime" not in excluded and excluded
    assert len(ids(kind="lora")[:2]) == 2
    assert len(skilled.candidates(query, k=2)) == 2


def test_candidates_ties_break_by_id_and_cache_sees_writes(store):
    same = unit(7)
    store.upsert_experts([make_expert(f"civitai:{i}", embedding=same) for i in (3, 1, 2)])
    assert [c.expert.id for c in store.candidates(same, k=2)] == ["civitai:1", "civitai:2"]
    store.upsert_experts([make_expert("civitai:0", embedding=same)])
    assert [c.expert.id for c in store.candidates(same, k=2)] == ["civitai:0", "civitai:1"]
    store.delete_expert("civitai:0")
    assert [c.expert.id for c in store.candidates(same, k=5)] == ["civitai:1", "civitai:2", "civitai:3"]


def test_wrong_embedding_dimension_is_rejected(store):
    store.upsert_experts([make_expert("civitai:1")])
    with pytest.raises(GraphError, match="dimension"):
        store.candidates(unit(1, dim=16), k=3)
    with pytest.raises(GraphError, match="dimension"):
        store.upsert_experts([make_expert("civitai:2", embedding=unit(2, dim=16))])
    with pytest.raises(NotFoundError):
        store.get_expert("civitai:2")


def test_link_similar_connects_same_family_neighbours(store):
    store.upsert_experts(
        [make_expert(f"civitai:{i}", base_family="sd15") for i in range(4)]
        + [make_expert("civitai:x1", base_family="sdxl"), make_expert("civitai:x2", base_family="sdxl")]
    )
    assert store.link_similar(k=2) == 4 * 2 + 2 * 1
    assert store.link_similar(k=2) == 10  # recomputed, not duplicated
    assert store.stats().relationships["SIMILAR_TO"] == 10
    sub = store.activate_subgraph(["civitai:x1"])
    assert {n.id for n in sub.nodes} == {"civitai:x1", "civitai:x2"}


# activation -----------------------------------------------------------------------------------------
def test_activate_subgraph(store):
    store.upsert_experts(
        [
            make_expert("civitai:c", kind="checkpoint", popularity=0.5),
            make_expert("civitai:l", kind="lokr"),
            make_expert("civitai:n"),
        ]
    )
    store.upsert_ref_prompts(prompts(3))
    store.write_capabilities(
        [
            cap("civitai:c", "ref:0", 0.2, metrics={"clip_gain": 0.01}),
            cap("civitai:l", "ref:1", 0.8),
            cap("civitai:n", "ref:2", 0.3),
        ]
    )
    store.link_similar(k=1)
    sub = store.activate_subgraph(["civitai:c", "civitai:l"])
    index = sub.index
    assert [n.id for n in sub.nodes[:2]] == ["civitai:c", "civitai:l"]
    types = {n.id: n.node_type for n in sub.nodes}
    assert types["civitai:c"] == "checkpoint" and types["civitai:l"] == "lora"
    assert {"ref:0", "ref:1"} <= set(index) and "ref:2" not in index
    assert sub.nodes[index["civitai:c"]].popularity == pytest.approx(0.5)
    assert sub.nodes[index["civitai:c"]].family == "sd15"
    caps = {(e.src, e.dst): e for e in sub.edges if e.type == "CAPABILITY"}
    assert set(caps) == {("civitai:c", "ref:0"), ("civitai:l", "ref:1")}
    assert caps[("civitai:c", "ref:0")].score == pytest.approx(0.2, abs=1e-6)
    assert caps[("civitai:c", "ref:0")].metrics == pytest.approx({"clip_gain": 0.01})
    similar = [e for e in sub.edges if e.type == "SIMILAR_TO"]
    assert similar and all(e.src in index and e.dst in index for e in similar)
    assert all("civitai:c" in (e.src, e.dst) or "civitai:l" in (e.src, e.dst) for e in similar)
    assert sub.embeddings.shape == (len(sub.nodes), 384)
    assert np.allclose(sub.embeddings[index["ref:0"]], unit(1000), atol=1e-6)
    assert np.allclose(sub.embeddings[index["civitai:c"]], store.get_expert("civitai:c").embedding, atol=1e-6)
    with_prompt = store.activate_subgraph(["civitai:c", "civitai:l"], prompt_embedding=unit(1001))
    assert with_prompt.prompt_node == PROMPT_NODE_ID
    prompt_edges = [e for e in with_prompt.edges if e.type == "PROMPT_SIMILAR"]
    assert prompt_edges[0].dst == "ref:1"  # the prompt is ref:1's own embedding
    data = with_prompt.to_pyg()
    assert data.num_nodes == len(with_prompt.nodes)
    assert data.edge_index.shape[1] == 2 * len(with_prompt.edges)


def test_activate_unknown_expert_raises_naming_it(store):
    store.upsert_experts([make_expert("civitai:1")])
    with pytest.raises(NotFoundError, match="civitai:404"):
        store.activate_subgraph(["civitai:1", "civitai:404"])


# generations ----------------------------------------------------------------------------------------
def test_record_generation_is_idempotent(store):
    store.upsert_experts([make_expert("civitai:1"), make_expert("civitai:2", kind="checkpoint")])
    used = [("civitai:1", 0.7), ("civitai:2", 1.0)]
    store.record_generation("gen-1", "a castle", used, created_at=T0)
    store.record_generation("gen-1", "a castle", used, created_at=T0)
    stats = store.stats()
    assert stats.nodes["Generation"] == 1 and stats.relationships["USED"] == 2
    store.record_generation("gen-1", "a castle", [("civitai:1", 0.5)])
    assert store.stats().relationships["USED"] == 1
    store.record_generation("gen-2", "", [])
    assert store.stats().nodes["Generation"] == 2


def test_record_generation_with_unknown_expert_writes_nothing(store):
    store.upsert_experts([make_expert("civitai:1")])
    with pytest.raises(NotFoundError, match="civitai:404"):
        store.record_generation("gen-1", "p", [("civitai:1", 0.5), ("civitai:404", 0.5)])
    stats = store.stats()
    assert stats.nodes["Generation"] == 0 and stats.relationships["USED"] == 0


def test_stats_counts_labels(store):
    store.upsert_experts(
        [
            make_expert("civitai:1", kind="checkpoint", tags=["a"]),
            make_expert("civitai:2", kind="lora", tags=["a", "b"], creator="bob"),
            make_expert("civitai:3", kind="loha", tags=[], creator="", base_family="sdxl"),
        ]
    )
    store.upsert_ref_prompts(prompts(2))
    nodes = store.stats().nodes
    assert nodes == {
        "Expert": 3,
        "Checkpoint": 1,
        "LoRA": 2,
        "Embedding": 0,
        "BaseModel": 2,
        "Tag": 2,
        "Creator": 2,
        "RefPrompt": 2,
        "Generation": 0,
    }


def test_search_corpus_is_cached_until_a_write(store):
    store.upsert_experts([make_expert("civitai:1", source_model_id="9", showcase_prompts=["a zorblax fox"])])
    corpus = store.search_corpus()
    assert store.search_corpus() is corpus  # no write in between: the same in-memory corpus
    assert [e.id for e in corpus.experts] == ["civitai:1"] and corpus.experts[0].showcase_prompts == ["a zorblax fox"]
    assert corpus.lexical_scores(["zorblax"])[0] > 0 and corpus.find("1.safetensors") == 0
    store.upsert_experts([make_expert("civitai:2", source_model_id="9", kind="checkpoint")])
    fresh = store.search_corpus()
    assert fresh is not corpus and [e.id for e in fresh.experts] == ["civitai:1", "civitai:2"]
    assert list(fresh.model_keys) == ["civitai:model:9", "civitai:model:9"]
    assert list(fresh.slice_mask("lora", "sd15")) == [True, False]
    store.delete_expert("civitai:2")
    assert [e.id for e in store.search_corpus().experts] == ["civitai:1"]
