"""The Neo4j store's Python logic that needs no server: row building, result mapping, ranking, errors.

Rows are fed back the way Neo4j returns them (null properties absent, datetimes as ``neo4j.time`` values);
no server is faked. The server-backed behaviour is the contract suite (``test_contract.py``, NEO4J_URI).
"""

from __future__ import annotations

import inspect
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pytest
from neo4j.time import DateTime

from core.types import Capability, Expert, ExpertKind, NotFoundError, RefPrompt
from graphdb.neo4j import store as s
from graphdb.store import GraphError, GraphStore, GraphUnavailable
from tests.graphdb.conftest import make_expert, unit


def as_stored(props: dict[str, Any]) -> dict[str, Any]:
    """What ``properties(n)`` returns after ``SET n += props``: nulls removed, datetimes as driver types."""
    return {k: (DateTime.from_native(v) if isinstance(v, datetime) else v) for k, v in props.items() if v is not None}


def test_expert_round_trips_through_a_row() -> None:
    at = datetime(2026, 11, 26, 12, 30, 5, 123456, tzinfo=UTC)
    expert = make_expert(
        "civitai:42",
        kind="locon",
        tags=[" anime ", "anime", "", "style"],
        created_at=at,
        calibrated_at=at,
        ref_set_version="v1",
        recommended_weight=None,
        allow_commercial_use="{Image,Sell}",
    )
    row = s.expert_row(expert)
    assert row["id"] == "civitai:42" and row["label"] == "LoRA"
    assert row["tags"] == ["anime", "style"]  # links: stripped, deduplicated, no empties
    assert row["props"]["kind"] == "locon" and row["props"]["commercial_use_ok"] is True
    assert "id" not in row["props"] and "files" not in row["props"]
    back = s.expert_from_props({"id": "civitai:42", **as_stored(row["props"])})
    assert back == expert
    assert back.calibrated_at == at and back.files[0].sha256 == "ab" * 32


def test_expert_from_props_ignores_unknown_properties_and_defaults_missing_ones() -> None:
    back = s.expert_from_props(
        {"id": "hf:a/b", "source": "huggingface", "name": "B", "kind": "checkpoint", "added_in_browser": 1}
    )
    assert back.kind is ExpertKind.checkpoint and back.files == [] and back.embedding is None and back.tags == []


def test_classify_by_content_hash_then_record_hash() -> None:
    expert = make_expert("civitai:1")
    digest = s.record_hash(expert)
    assert s.classify(expert, None, digest) == "created"
    assert s.classify(expert, {"content_hash": expert.content_hash}, digest) == "unchanged"
    assert s.classify(expert, {"content_hash": "old"}, digest) == "updated"
    no_hash = make_expert("civitai:1", content_hash="")
    assert s.classify(no_hash, {"content_hash": None, "record_hash": s.record_hash(no_hash)}, "x") == "updated"
    assert s.classify(no_hash, {"record_hash": s.record_hash(no_hash)}, s.record_hash(no_hash)) == "unchanged"
    renamed = make_expert("civitai:1", content_hash="", name="Other")
    assert s.record_hash(renamed) != s.record_hash(no_hash)


def test_calibration_kept_on_same_hash_cleared_on_new_hash_and_overridden_by_the_record() -> None:
    at = DateTime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    stored = {"content_hash": "hash-civitai:1", "calibrated_at": at, "ref_set_version": "v1", "scorer_version": "s1"}
    same = s.with_stored_calibration(make_expert("civitai:1"), stored)
    assert same.calibrated_at == at.to_native() and same.ref_set_version == "v1" and same.scorer_version == "s1"
    changed = s.with_stored_calibration(make_expert("civitai:1", content_hash="new"), stored)
    assert changed.calibrated_at is None and changed.ref_set_version == "" and changed.scorer_version == ""
    own = s.with_stored_calibration(make_expert("civitai:1", ref_set_version="v2"), stored)
    assert own.ref_set_version == "v2" and own.scorer_version == "s1"
    assert s.with_stored_calibration(make_expert("civitai:1"), None).calibrated_at is None


@pytest.mark.parametrize(
    "value,ok",
    [("", False), ("None", False), ("{}", False), ("[]", False), ("false", False), ("Sell", True),
     ("{Image,RentCivit,Rent,Sell}", True), ("Image", True)],
)  # fmt: skip
def test_commercial_use_rule(value: str, ok: bool) -> None:
    assert s.commercial_use_ok(value) is ok


def test_kind_filter_groups_adapters() -> None:
    adapters = ["lora", "locon", "loha", "lokr"]
    assert s.kinds_for(None) is None and s.kinds_for("") is None
    assert s.kinds_for("lora") == adapters and s.kinds_for(ExpertKind.loha) == adapters
    assert s.kinds_for("Checkpoint") == ["checkpoint"]
    with pytest.raises(GraphError, match="unknown expert kind"):
        s.kinds_for("vae")


def test_capability_metrics_are_flat_properties_and_round_trip() -> None:
    at = datetime(2026, 5, 1, tzinfo=UTC)
    cap = Capability(
        expert_id="civitai:1", prompt_id="p1", score=0.75, metrics={"clip_gain": 0.03, "aesthetic_gain": -0.5},
        n_images=4, calibrated_at=at, ref_set_version="v1",
    )  # fmt: skip
    props = s.capability_props(cap)
    assert props["clip_gain"] == 0.03 and props["score"] == 0.75 and "metrics" not in props
    assert s.capability_from_props("civitai:1", "p1", as_stored(props)) == cap
    with pytest.raises(GraphError, match="reserved"):
        s.capability_props(cap.model_copy(update={"metrics": {"score": 1.0}}))


def test_ref_prompt_round_trip() -> None:
    prompt = RefPrompt(id="v1:p1", category="portrait", text="a cat", set_version="v1", embedding=unit(3))
    row = s.ref_prompt_row(prompt)
    assert s.ref_prompt_from_props({"id": row["id"], **as_stored(row["props"])}) == prompt


def test_top_k_similar_stays_within_family_skips_self_and_breaks_ties_by_id() -> None:
    ids = ["a", "b", "c", "d", "e"]
    families = ["sd15", "sd15", "sd15", "sdxl", "sdxl"]
    m = np.array([[1, 0], [1, 0], [0.6, 0.8], [0, 1], [1, 0]], dtype=np.float32)
    edges = s.top_k_similar(ids, families, m, k=1)
    assert edges == [("a", "b", pytest.approx(1.0)), ("b", "a", pytest.approx(1.0)), ("c", "a", pytest.approx(0.6)),
                     ("d", "e", pytest.approx(0.0)), ("e", "d", pytest.approx(0.0))]  # fmt: skip
    assert len(s.top_k_similar(ids, families, m, k=5)) == 3 * 2 + 2 * 1
    assert s.top_k_similar(ids, families, m, k=0) == []


def test_rank_candidates_is_exact_cosine_best_first() -> None:
    query = np.array(unit(1), dtype=np.float64)
    near = make_expert("civitai:2", embedding=(np.array(unit(1)) * 3).tolist())  # same direction, not unit
    far = make_expert("civitai:1", embedding=unit(2))
    tie = make_expert("civitai:0", embedding=unit(1))
    wrong_dim = make_expert("civitai:9", embedding=[1.0, 0.0])
    ranked = s.rank_candidates([far, near, wrong_dim, tie], query, k=2)
    assert [c.expert.id for c in ranked] == ["civitai:0", "civitai:2"]  # tie at cosine 1 broken by id
    assert ranked[0].score == pytest.approx(1.0) and ranked[1].score == pytest.approx(1.0)
    assert s.rank_candidates([far], query, k=5)[0].score == pytest.approx(float(np.dot(unit(1), unit(2))), abs=1e-6)


def test_build_subgraph_orders_nodes_and_keeps_metrics() -> None:
    a = make_expert("civitai:1", kind="checkpoint", popularity=0.5)
    b = make_expert("civitai:2").model_copy(update={"embedding": None})
    prompt = RefPrompt(id="p1", category="portrait", text="a cat", embedding=unit(7))
    cap = Capability(expert_id=a.id, prompt_id="p1", score=0.9, metrics={"clip_gain": 0.1})
    sub = s.build_subgraph(
        [a, b],
        [{"src": a.id, "dst": b.id, "score": 0.4}],
        [{"expert_id": a.id, "prompt": {"id": "p1", **as_stored(s.ref_prompt_row(prompt)["props"])},
          "capability": as_stored(s.capability_props(cap))}],
        dim=384,
    )  # fmt: skip
    assert [(n.id, n.node_type) for n in sub.nodes] == [(a.id, "checkpoint"), (b.id, "lora"), ("p1", "refprompt")]
    assert sub.nodes[0].popularity == 0.5 and sub.nodes[2].category == "portrait"
    assert {(e.src, e.dst, e.type) for e in sub.edges} == {(a.id, b.id, "SIMILAR_TO"), (a.id, "p1", "CAPABILITY")}
    assert next(e for e in sub.edges if e.type == "CAPABILITY").metrics == {"clip_gain": 0.1}
    assert sub.embeddings.shape == (3, 384)
    assert np.allclose(sub.embeddings[1], 0) and np.allclose(sub.embeddings[2], unit(7))


def test_server_version_picks_the_vector_index_variant() -> None:
    assert s.parse_version(["5.26.0"]) == (5, 26, 0) and s.parse_version(["2025.10.1"]) == (2025, 10, 1)
    assert s.parse_version(["weird"]) == (0,)
    assert s.vector_index_mode((2025, 1, 0)) == "ddl" and s.vector_index_mode((5, 15, 0)) == "ddl"
    assert s.vector_index_mode((5, 11, 0)) == "procedure" and s.vector_index_mode((5, 14)) == "procedure"
    assert s.vector_index_mode((5, 10, 0)) == "none" and s.vector_index_mode((4, 4, 30)) == "none"


def test_check_vector_rejects_empty_and_non_finite() -> None:
    with pytest.raises(GraphError, match="empty"):
        s.check_vector("query", [])
    with pytest.raises(GraphError, match="non-finite"):
        s.check_vector("query", [1.0, float("nan")])


@pytest.mark.parametrize("url", ["http://localhost:7474", "neo4j://", "localhost:7687", "bolt://[bad"])
def test_bad_url_is_a_one_line_graph_unavailable(url: str) -> None:
    with pytest.raises(GraphUnavailable, match="bad Neo4j URL") as info:
        s.Neo4jGraphStore(url, user="neo4j", password="x", database="neo4j")
    assert "\n" not in str(info.value)


def test_unreachable_server_is_a_one_line_graph_unavailable() -> None:
    with pytest.raises(GraphUnavailable, match="unreachable at bolt://127.0.0.1:1") as info:
        s.Neo4jGraphStore("bolt://127.0.0.1:1", user="neo4j", password="x", connection_timeout_s=2)
    assert "\n" not in str(info.value) and "refused" in str(info.value)


def test_store_implements_every_protocol_method_with_its_signature() -> None:
    for name, member in inspect.getmembers(GraphStore, inspect.isfunction):
        if name.startswith("_"):
            continue
        ours = getattr(s.Neo4jGraphStore, name)
        assert list(inspect.signature(ours).parameters) == list(inspect.signature(member).parameters), name
    params = inspect.signature(s.Neo4jGraphStore).parameters
    assert list(params)[:4] == ["uri", "user", "password", "database"] and params["database"].default == "neo4j"
    assert callable(s.Neo4jGraphStore.clear)


def test_missing_ids_message_names_them() -> None:
    assert s._missing_message("expert", ["a"]) == "unknown expert: 'a'"
    many = s._missing_message("reference prompt", [str(i) for i in range(12)])
    assert many.startswith("unknown reference prompts: '0'") and many.endswith("and 2 more")
    assert issubclass(NotFoundError, Exception) and Expert  # the store raises core's NotFoundError
