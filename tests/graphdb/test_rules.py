"""The backend-independent graph rules (``graphdb.rules``), once, on the CPU; plus the contract that both
backends apply the same SIMILAR_TO rule (``store`` runs per backend)."""

from __future__ import annotations

from datetime import UTC, datetime

import numpy as np
import pytest

from core.types import ExpertKind, NotFoundError
from graphdb import rules
from graphdb.embedded import queries as eq
from graphdb.errors import GraphError
from graphdb.subgraph import SubgraphNode
from tests.graphdb.conftest import make_expert, unit


def test_top_k_breaks_ties_by_index_even_across_the_boundary() -> None:
    scores = np.array([0.5, 0.9, 0.5, 0.5, -np.inf, 0.5 + 1e-9])
    assert rules.top_k(scores, 2).tolist() == [1, 0]
    assert rules.top_k(scores, 10).tolist() == [1, 0, 2, 3, 5]  # -inf is never returned
    assert rules.top_k(scores, 0).tolist() == [] and rules.top_k(np.array([-np.inf]), 3).tolist() == []
    # noise below SCORE_DECIMALS does not beat the index order
    assert rules.top_k(np.array([0.7, 0.7 + 4e-7]), 1).tolist() == [0]
    assert rules.top_k(np.array([0.7, 0.7 + 2e-6]), 1).tolist() == [1]


def test_similar_picks_the_smallest_ids_among_many_ties() -> None:
    ids = [f"e{i:02d}" for i in range(40)]
    matrix = np.tile(np.array([[1.0, 0.0]], dtype=np.float32), (40, 1))
    edges = rules.top_k_similar(ids, ["sd15"] * 40, matrix, k=2)
    by_src: dict[str, list[str]] = {}
    for src, dst, score in edges:
        by_src.setdefault(src, []).append(dst)
        assert score == 1.0
    assert (
        by_src["e00"] == ["e01", "e02"]
        and by_src["e01"] == ["e00", "e02"]
        and by_src["e39"] == ["e00", "e01"]
    )


def test_similar_rounds_before_the_id_tie_break_and_scores_are_the_rounded_cosines() -> None:
    # b and c are equally similar to a up to float noise (< 1e-6): the smaller id wins, as in every backend
    a = np.array([1.0, 0.0, 0.0])
    b = np.array([0.6, 0.8, 0.0])
    c = np.array([0.6 + 3e-7, 0.0, 0.8])
    raw = np.stack([a, b, c]) @ a / np.linalg.norm(np.stack([a, b, c]), axis=1)
    assert raw[2] > raw[1]  # without rounding, c would win
    edges = rules.top_k_similar(["a", "b", "c"], ["x", "x", "x"], np.stack([a, b, c]), k=1)
    assert edges[0] == ("a", "b", 0.6)
    assert all(round(score, 6) == score for _, _, score in edges)


def test_similar_stays_within_family_and_handles_small_families() -> None:
    m = np.array([[1, 0], [0, 1], [1, 0]], dtype=np.float32)
    edges = rules.top_k_similar(["a", "b", "c"], ["sd15", "sdxl", None], m, k=3)
    assert edges == []  # three families of one expert each (None is its own family, "")
    assert rules.top_k_similar([], [], np.zeros((0, 2)), k=2) == []


def test_rank_candidates_orders_by_rounded_cosine_then_id() -> None:
    query = np.array(unit(1), dtype=np.float32)
    same = [make_expert(f"civitai:{i}", embedding=unit(1)) for i in (9, 3, 5)]
    other = make_expert("civitai:1", embedding=unit(2))
    ranked = rules.rank_candidates([*same, other, make_expert("civitai:0", embedding=[1.0, 0.0])], query, k=3)
    assert [c.expert.id for c in ranked] == ["civitai:3", "civitai:5", "civitai:9"]


def test_kind_filter_expansion_and_labels() -> None:
    assert rules.kind_label(None) is None and rules.kind_label("") is None
    assert rules.kind_label("LoKr") == "LoRA" and rules.kind_label(ExpertKind.checkpoint) == "Checkpoint"
    assert rules.kind_values("locon") == ["lora", "locon", "loha", "lokr"]
    with pytest.raises(GraphError, match="unknown expert kind 'vae'"):
        rules.kind_label("vae")


def test_upsert_classification_and_the_calibration_rule() -> None:
    at = datetime(2026, 1, 2, tzinfo=UTC)
    stored = {
        "content_hash": "hash-civitai:1",
        "calibrated_at": at,
        "ref_set_version": "v1",
        "scorer_version": "",
    }
    kept = rules.with_stored_calibration(make_expert("civitai:1"), stored)
    assert kept.calibrated_at == at and kept.ref_set_version == "v1" and kept.scorer_version == ""
    assert (
        rules.with_stored_calibration(make_expert("civitai:1", content_hash="new"), stored).calibrated_at
        is None
    )
    expert = make_expert("civitai:1", content_hash="")
    digest = rules.record_hash(expert)
    assert digest == rules.record_hash(expert, rules.record_json(expert))
    assert (
        rules.record_hash(expert.model_copy(update={"calibrated_at": at})) == digest
    )  # calibration not hashed
    assert rules.record_hash(expert.model_copy(update={"embedding": unit(3)})) != digest
    assert rules.classify(expert, None, digest) == "created"
    assert rules.classify(expert, {"record_hash": digest}, digest) == "unchanged"
    assert rules.classify(expert, {"record_hash": "old"}, digest) == "updated"


def test_batch_and_dimension_checks() -> None:
    assert rules.check_dimensions(None, []) is None
    assert rules.check_dimensions(None, [("a", 3), ("b", 3)]) == 3
    with pytest.raises(GraphError, match="'b'.*2 dimensions, the graph stores 3"):
        rules.check_dimensions(None, [("a", 3), ("'b'", 2)])
    with pytest.raises(GraphError, match="query embedding has 2 dimensions, the graph stores 3"):
        rules.check_query_dimension("query", np.zeros(2), 3)
    rules.check_query_dimension("query", np.zeros(2), None)
    with pytest.raises(NotFoundError, match=r"^unknown experts: 'a', 'c'$"):
        rules.require_known("expert", ["c", "b", "a"], ["b"])
    rules.require_known("expert", ["b"], ["b"])
    assert rules.link_targets(make_expert("civitai:1", tags=[" a ", "a", "", "b"], creator="")) == {
        "BASED_ON": ["sd15"],
        "TAGGED": ["a", "b"],
        "CREATED_BY": [],
    }


def test_generation_record_validation() -> None:
    assert rules.generation_coefficients("g", [("a", 1), ("b", 0.5), ("a", 0.25)]) == {"a": 0.25, "b": 0.5}
    with pytest.raises(GraphError, match="needs an id"):
        rules.generation_coefficients("", [])
    with pytest.raises(GraphError, match="non-finite coefficient for 'a'"):
        rules.generation_coefficients("g", [("a", float("nan"))])
    assert len(rules.generation_prompt("x" * 30_000)) == 20_000  # core.types.MAX_TEXT


def test_assemble_subgraph_orders_nodes_and_edges_and_rounds_scores() -> None:
    a = rules.expert_node("civitai:1", "checkpoint", "A", "sd15", None)
    b = rules.expert_node("civitai:2", "lokr", "B", "", 0.5)
    assert (a.node_type, b.node_type, a.popularity, b.family) == ("checkpoint", "lora", 0.0, "")
    p1, p2 = SubgraphNode("p1", "refprompt", text="one"), SubgraphNode("p2", "refprompt", text="two")
    sub = rules.assemble_subgraph(
        [(a, unit(1, dim=4)), (b, None)],
        [
            ("civitai:2", "civitai:1", 0.123456789),
            ("civitai:1", "civitai:2", 0.5),
            ("civitai:1", "civitai:2", 0.5),
        ],
        [("civitai:1", "p2", 0.25, {"clip_gain": 0.1}), ("civitai:1", "p1", 1 / 3, {})],
        {"p1": (p1, [1.0, 0.0, 0.0]), "p2": (p2, unit(2, dim=4))},  # p1 has another dimension: zero row
        dim=4,
    )
    assert [n.id for n in sub.nodes] == ["civitai:1", "civitai:2", "p1", "p2"]
    assert [(e.src, e.dst, e.type, e.score) for e in sub.edges] == [
        ("civitai:1", "civitai:2", "SIMILAR_TO", 0.5),
        ("civitai:2", "civitai:1", "SIMILAR_TO", 0.123457),
        ("civitai:1", "p1", "CAPABILITY", 0.333333),
        ("civitai:1", "p2", "CAPABILITY", 0.25),
    ]
    assert sub.edges[3].metrics == {"clip_gain": 0.1}
    assert np.allclose(sub.embeddings[[1, 2]], 0) and np.allclose(sub.embeddings[3], unit(2, dim=4))
    assert rules.neighbour_ids(["b"], [("b", "z", 1.0), ("a", "b", 1.0), ("b", "a", 1.0)]) == ["a", "z"]
    assert rules.attach_prompt(sub, None, 4) is sub
    with pytest.raises(GraphError, match="prompt embedding has 3 dimensions, the graph stores 4"):
        rules.attach_prompt(sub, [1.0, 0.0, 0.0], 4)


def test_embedded_statements_take_identifiers_only_from_the_allow_list_and_all_parse(tmp_path) -> None:
    from graphdb.embedded.store import EmbeddedGraphStore

    with pytest.raises(ValueError, match="not allowed"):
        eq.identifier("Expert) DETACH DELETE (n")
    assert set(eq.REL_COUNT_QUERIES) == set(eq.LOAD_RELS_QUERIES) == set(eq.RELATIONSHIPS)
    with EmbeddedGraphStore(str(tmp_path / "graph")) as store:
        for statement in eq.all_statements():  # prepared against the real schema (bulk input ones excepted)
            store._engine._statement(statement)


def test_both_backends_write_the_same_near_tied_similar_edges(store) -> None:
    """The divergence this module removed: near-tied cosines (float noise apart) are broken by id, and the
    edge carries the rounded cosine, on every backend."""
    base = np.array(unit(7))
    side = np.array(unit(8))
    side -= side @ base * base
    side /= np.linalg.norm(side)
    experts = [make_expert("civitai:a", embedding=base.tolist())]
    for name, (x, eps) in {
        "civitai:c": (0.6, 0.0),
        "civitai:b": (0.6, 3e-7),
        "civitai:d": (0.3, 0.0),
    }.items():
        v = (x + eps) * base + np.sqrt(1 - x * x) * side  # b's cosine to a is 3e-7 above c's
        experts.append(make_expert(name, embedding=v.tolist()))
    store.upsert_experts(experts)
    store.link_similar(k=1)
    sub = store.activate_subgraph(["civitai:a"])
    out = [(e.src, e.dst) for e in sub.edges if e.type == "SIMILAR_TO" and e.src == "civitai:a"]
    assert out == [("civitai:a", "civitai:b")]  # the tie is broken by id: b before c
    assert all(round(e.score, 6) == e.score for e in sub.edges)
