"""Unit tests of the Neo4j query builders: parameters, allow-listed identifiers, no injection."""

from __future__ import annotations

import itertools
import re

import pytest

from graphdb.neo4j import lint
from graphdb.neo4j import queries as q
from graphdb.store import NODE_LABELS, REL_TYPES

INJECTIONS = [
    "x' OR 1=1 //",
    "`) DETACH DELETE e //",
    'a"}) MATCH (n) DETACH DELETE n //',
    "$limit} RETURN 1 //",
    "x\nMATCH (n) DETACH DELETE n",
]
SAMPLE_VALUES = {
    "kind": ["lora", "locon"],
    "base_family": "sd15",
    "source": "civitai",
    "tag": "anime",
    "creator": "alice",
    "uncalibrated_for": "v1",
    "name_contains": "cat",
}


def params_in(query: str) -> set[str]:
    return set(re.findall(r"\$([A-Za-z_][A-Za-z0-9_]*)", query))


def test_quote_identifier_accepts_only_allow_listed_names() -> None:
    assert q.quote_identifier("Expert", NODE_LABELS) == "`Expert`"
    assert q.quote_identifier("SIMILAR_TO", REL_TYPES) == "`SIMILAR_TO`"
    for bad in ["Expert`) DETACH DELETE n //", "User", "", "expert"]:
        with pytest.raises(ValueError, match="not allowed"):
            q.quote_identifier(bad, NODE_LABELS)


def test_quote_identifier_escapes_backticks_of_allowed_names() -> None:
    assert q.quote_identifier("a`b", ["a`b"]) == "`a``b`"


def test_upsert_variants_set_their_label_and_remove_the_other() -> None:
    assert "SET e += row.props, e:`Checkpoint`" in q.UPSERT_CHECKPOINT_EXPERTS_QUERY
    assert "REMOVE e:`LoRA`" in q.UPSERT_CHECKPOINT_EXPERTS_QUERY
    assert "SET e += row.props, e:`LoRA`" in q.UPSERT_LORA_EXPERTS_QUERY
    assert "REMOVE e:`Checkpoint`" in q.UPSERT_LORA_EXPERTS_QUERY
    assert q.upsert_experts_query("LoRA") is q.UPSERT_LORA_EXPERTS_QUERY
    for bad in ["Expert", "lora", "LoRA`) DETACH DELETE e //"]:
        with pytest.raises(ValueError):
            q.upsert_experts_query(bad)


@pytest.mark.parametrize(
    "combo",
    [c for n in range(len(q.EXPERT_FILTER_CLAUSES) + 1) for c in itertools.combinations(q.EXPERT_FILTER_CLAUSES, n)],
)
def test_find_experts_every_variant_is_parameterised_and_composed_of_linted_fragments(combo: tuple) -> None:
    filters = {k: SAMPLE_VALUES[k] for k in combo}
    query, params = q.find_experts_query(filters, limit=7)
    assert params_in(query) == set(params)
    assert params["limit"] == 7
    for key in combo:
        assert params["kinds" if key == "kind" else key] == SAMPLE_VALUES[key]
    # The lint checks the no-filter, single-filter and all-filter texts; every variant is exactly the
    # fixed head and tail around an AND of the same fragments, in the table's order.
    fragments = [q.EXPERT_FILTER_CLAUSES[k] for k in q.EXPERT_FILTER_CLAUSES if k in combo]
    where = ("\nWHERE " + "\n  AND ".join(fragments)) if fragments else ""
    assert query == f"MATCH (e:Expert){where}\nRETURN properties(e) AS expert\nORDER BY e.id\nLIMIT $limit"


@pytest.mark.parametrize("value", INJECTIONS)
def test_filter_values_never_reach_the_query_text(value: str) -> None:
    filters = {k: ([value] if k == "kind" else value) for k in q.EXPERT_FILTER_CLAUSES}
    query, params = q.find_experts_query(filters, limit=10)
    assert value not in query
    assert params["name_contains"] == value and params["kinds"] == [value]
    cap_query, cap_params = q.get_capabilities_query(value, value)
    assert value not in cap_query
    assert cap_params == {"expert_id": value, "prompt_id": value}


def test_find_experts_rejects_unknown_filters() -> None:
    with pytest.raises(ValueError, match="unknown expert filters"):
        q.find_experts_query({"e.id) DETACH DELETE e //": "x"}, limit=1)


def test_find_experts_none_values_are_no_filter() -> None:
    assert q.find_experts_query({k: None for k in q.EXPERT_FILTER_CLAUSES}, 5) == q.find_experts_query({}, 5)


@pytest.mark.parametrize("expert_id,prompt_id", [(None, None), ("e", None), (None, "p"), ("e", "p")])
def test_get_capabilities_variants(expert_id: str | None, prompt_id: str | None) -> None:
    query, params = q.get_capabilities_query(expert_id, prompt_id)
    assert params_in(query) == set(params)
    assert ("$expert_id" in query) == (expert_id is not None)
    assert ("$prompt_id" in query) == (prompt_id is not None)


def test_vector_index_ddl_validates_dimensions() -> None:
    query, params = q.create_vector_index_query(384)
    assert "`vector.dimensions`: 384" in query and "'cosine'" in query and params == {}
    assert q.create_vector_index_query(1536)[0].count("1536") == 1
    for bad in [0, -1, 5000, "384", 3.5, True]:
        with pytest.raises(ValueError):
            q.create_vector_index_query(bad)  # type: ignore[arg-type]


def test_vector_variants_are_separate_constants() -> None:
    assert "db.index.vector.queryNodes" in q.CANDIDATES_VECTOR_INDEX_QUERY
    assert "db.index.vector" not in q.CANDIDATES_BRUTE_FORCE_QUERY
    assert "reduce(" in q.CANDIDATES_BRUTE_FORCE_QUERY
    # same filters in both, so both variants return the same experts
    filters = q._CANDIDATE_FILTERS
    assert filters in q.CANDIDATES_VECTOR_INDEX_QUERY and filters in q.CANDIDATES_BRUTE_FORCE_QUERY


def test_schema_covers_every_unique_key() -> None:
    ddl = "\n".join(q.schema_queries())
    for label, prop in [
        ("Expert", "id"),
        ("RefPrompt", "id"),
        ("Generation", "id"),
        ("BaseModel", "name"),
        ("Tag", "name"),
        ("Creator", "name"),
    ]:
        assert f"FOR (n:`{label}`) REQUIRE n.`{prop}` IS UNIQUE" in ddl
    assert ddl.count("IF NOT EXISTS") == len(q.schema_queries())  # idempotent


def test_stats_and_clear_cover_every_allow_listed_name() -> None:
    for label in NODE_LABELS:
        assert f"MATCH (n:`{label}`) RETURN '{label}' AS name" in q.NODE_COUNTS_QUERY
        assert f"n:`{label}`" in q.CLEAR_QUERY
    for rel in REL_TYPES:
        assert f"[r:`{rel}`]" in q.RELATIONSHIP_COUNTS_QUERY


def test_constants_use_only_declared_parameters_and_no_template_leftovers() -> None:
    for name, query in lint.constant_queries():
        assert params_in(query) <= set(lint.PARAMETERS), name
        assert not re.search(r"\{[a-z_]+\}", query), name  # an unformatted {placeholder}
