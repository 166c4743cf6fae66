"""Every Cypher statement of the Neo4j backend passes Neo4j's own parser (no server needed).

One node process lints everything (the backend's statements and planted mistakes) for the whole module.
Node is required: CI has it, so a missing node fails here instead of silently skipping.
"""

from __future__ import annotations

import re
import shutil

import pytest

from graphdb.neo4j import lint
from graphdb.neo4j import queries as q

# Statements allowed a warning, with the reason. Everything else must lint without any diagnostic.
ALLOWED_WARNINGS = {
    # Neo4j 5.11-5.14 have no CREATE VECTOR INDEX; the store only sends this to those servers.
    "CREATE_VECTOR_INDEX_PROCEDURE_QUERY": "deprecated",
}

PLANTED = [
    ("planted:limit-typo", "MATCH (e:Expert) RETURN e LIMT 5"),
    ("planted:missing-paren", "MATCH (e:Expert {id: $id} RETURN e"),
    ("planted:undeclared-parameter", "MATCH (e:Expert {id: $expert_idd}) RETURN e"),
    ("planted:misspelled-procedure", "CALL db.index.vector.queryNode($index_name, $k, $embedding) YIELD node RETURN node"),
    ("planted:procedure-arity", "CALL db.index.vector.queryNodes($index_name, $k) YIELD node RETURN node"),
    ("planted:broken-constant", q.WRITE_CAPABILITIES_QUERY.replace("MERGE", "MERG")),
    ("planted:clean", "MATCH (e:Expert {id: $id}) RETURN e.name AS name LIMIT 5"),
]


@pytest.fixture(scope="module")
def statements() -> list[lint.Statement]:
    return lint.all_queries()


@pytest.fixture(scope="module")
def diagnostics(statements: list[lint.Statement]) -> list[lint.Diagnostic]:
    assert shutil.which("node"), "node is required for the Cypher lint (CI installs Node.js 20)"
    # The planted statements declare their own parameters, so they form their own lint group: a group with
    # an error is re-linted statement by statement, which must not slow down the backend's group.
    planted = [(name, query, ["id", "index_name", "k", "embedding", "rows"]) for name, query in PLANTED]
    return lint.lint_queries([*statements, *planted])


def test_every_statement_lints_without_errors(diagnostics: list[lint.Diagnostic]) -> None:
    ours = [d for d in diagnostics if not d.name.startswith("planted:")]
    errors = [str(d) for d in ours if d.severity == "error"]
    assert errors == []
    unexpected = [
        str(d) for d in ours if d.severity != "error" and ALLOWED_WARNINGS.get(d.name, "\0") not in d.message
    ]
    assert unexpected == []


@pytest.mark.parametrize("name", [name for name, _ in PLANTED if name != "planted:clean"])
def test_planted_mistakes_are_reported(diagnostics: list[lint.Diagnostic], name: str) -> None:
    assert any(d.name == name and d.severity == "error" for d in diagnostics), name


def test_planted_typo_message_and_position(diagnostics: list[lint.Diagnostic]) -> None:
    typo = next(d for d in diagnostics if d.name == "planted:limit-typo")
    assert "LIMT" in typo.message
    assert (typo.line, typo.column) == (1, 27)
    assert not [d for d in diagnostics if d.name == "planted:clean"]


def test_lint_covers_every_statement(statements: list[lint.Statement]) -> None:
    texts = {s[1] for s in statements}
    names = {s[0] for s in statements}
    for name, value in vars(q).items():
        if re.fullmatch(r"[A-Z][A-Z0-9_]*_QUERY", name) and isinstance(value, str):
            assert value in texts, name
        if re.fullmatch(r"[A-Z][A-Z0-9_]*_QUERIES", name):
            assert set(value) <= texts, name
    assert q.create_vector_index_query()[0] in texts
    for label in q.EXPERT_LABELS:
        assert q.upsert_experts_query(label) in texts
    for expert_id in (None, "e"):
        for prompt_id in (None, "p"):
            assert q.get_capabilities_query(expert_id, prompt_id)[0] in texts
    assert q.find_experts_query({}, 10)[0] in texts
    saved = {n.removeprefix("saved:") for n in names if n.startswith("saved:")}
    assert {
        "Expert neighbourhood",
        "Top experts per reference prompt",
        "What a generation used",
        "Uncalibrated experts",
        "Most similar experts",
    } <= saved


def test_missing_node_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lint.shutil, "which", lambda name: None)
    with pytest.raises(lint.LintUnavailable, match="node is not installed"):
        lint.lint_queries([("x", "RETURN 1")])
