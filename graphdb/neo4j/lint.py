"""Offline lint of every Cypher statement of the Neo4j backend with Neo4j's official parser.

No Neo4j server runs in CI, so this is how a typo in a statement is caught before it reaches one: the npm
package ``@neo4j-cypher/language-support`` (``lintCypherQuery``, installed by ``make install`` into
``graphdb/neo4j/lint/node_modules``) parses and semantically checks each statement; ``lint.mjs`` runs it once
for a whole batch.

Example::

    from graphdb.neo4j.lint import all_queries, lint_queries
    errors = [d for d in lint_queries(all_queries()) if d.severity == "error"]
"""

from __future__ import annotations

import itertools
import json
import re
import shutil
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from graphdb.neo4j import queries as q
from graphdb.store import NODE_LABELS, REL_TYPES

LINT_DIR = Path(__file__).parent / "lint"
SAVED_QUERIES = Path(__file__).resolve().parents[2] / "deploy" / "neo4j" / "saved_queries.cypher"

# Every parameter name the backend's constant statements use; builders declare their own exact names.
PARAMETERS = (
    "ids", "rows", "id", "index_name", "dimensions", "timeout_s", "calibrated_at", "ref_set_version",
    "scorer_version", "set_version", "fetch", "embedding", "k", "kinds", "base_family", "allow_nsfw",
    "require_commercial_use", "require_derivatives", "exclude_ids", "query_norm", "created_at", "now",
    "prompt", "used", "data_version",
)  # fmt: skip
# Parameters the saved Browser queries expect the user to set with ``:param``.
SAVED_QUERY_PARAMETERS = ("expert_id", "prompt_id", "generation_id", "limit")
# Properties the backend stores but never names as identifiers; declared so the lint schema is complete.
# Labels of internal bookkeeping nodes (not part of the graph model, so not in NODE_LABELS).
INTERNAL_LABELS = ("Meta",)
EXTRA_PROPERTY_KEYS = ("key", "value", "metrics", "n_images", "files_json", "description", "skill", "downloads", "likes")


class LintUnavailable(RuntimeError):
    """node or the npm package is missing (run ``make install``)."""


@dataclass(frozen=True)
class Diagnostic:
    name: str  # the statement's name (constant, builder variant or saved query)
    severity: str  # error | warning | info | hint
    message: str
    line: int
    column: int

    def __str__(self) -> str:
        return f"{self.name}:{self.line}:{self.column}: {self.severity}: {self.message.splitlines()[0]}"


Statement = tuple[str, str] | tuple[str, str, Sequence[str]]


def lint_queries(queries: Iterable[Statement], timeout_s: float = 120.0) -> list[Diagnostic]:
    """Lint ``(name, query)`` or ``(name, query, parameter names)`` statements in one node process.

    Statements without their own parameter names may use any name in ``PARAMETERS`` or
    ``SAVED_QUERY_PARAMETERS``; any other ``$name`` is an error, as is any syntax error.
    """
    node = shutil.which("node")
    if node is None:
        raise LintUnavailable("node is not installed: the Cypher lint needs Node.js >= 18")
    if not (LINT_DIR / "node_modules" / "@neo4j-cypher" / "language-support").is_dir():
        raise LintUnavailable(f"@neo4j-cypher/language-support missing: run `cd {LINT_DIR} && npm install`")
    items = []
    for stmt in queries:
        item: dict[str, object] = {"name": stmt[0], "query": stmt[1]}
        if len(stmt) == 3:
            item["parameters"] = list(stmt[2])  # type: ignore[misc]
        items.append(item)
    schema = {
        "labels": [*NODE_LABELS, *INTERNAL_LABELS],
        "relationshipTypes": list(REL_TYPES),
        "propertyKeys": sorted({*q.PROPERTY_KEYS, *EXTRA_PROPERTY_KEYS}),
        "parameters": [*PARAMETERS, *SAVED_QUERY_PARAMETERS],
    }
    proc = subprocess.run(
        [node, str(LINT_DIR / "lint.mjs")],
        input=json.dumps({"queries": items, "schema": schema}),
        capture_output=True,
        text=True,
        timeout=timeout_s,
        cwd=LINT_DIR,
        check=False,
    )
    if proc.returncode != 0:
        raise LintUnavailable(f"lint.mjs failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    return [
        Diagnostic(d["name"], d["severity"], d["message"], int(d["line"]), int(d["column"]))
        for d in json.loads(proc.stdout)
    ]


def constant_queries() -> list[tuple[str, str]]:
    """Every ``*_QUERY`` string and ``*_QUERIES`` tuple defined in ``graphdb.neo4j.queries``."""
    out: list[tuple[str, str]] = []
    for name, value in sorted(vars(q).items()):
        if re.fullmatch(r"[A-Z][A-Z0-9_]*_QUERY", name) and isinstance(value, str):
            out.append((name, value))
        elif re.fullmatch(r"[A-Z][A-Z0-9_]*_QUERIES", name) and isinstance(value, tuple):
            out.extend((f"{name}[{i}]", v) for i, v in enumerate(value))
    return out


_SAMPLE_FILTER_VALUES = {
    "kind": ["lora", "locon"],
    "base_family": "sd15",
    "source": "civitai",
    "tag": "anime",
    "creator": "someone",
    "uncalibrated_for": "v1",
    "name_contains": "x",
}


def builder_queries() -> list[tuple[str, str, list[str]]]:
    """Every variant every builder can produce, each with exactly the parameter names it returns."""
    out: list[tuple[str, str, list[str]]] = []
    query, params = q.create_vector_index_query(q.DEFAULT_EMBEDDING_DIM)
    out.append(("create_vector_index_query", query, list(params)))
    # find_experts: no filter, each filter alone, all filters. Every other combination is the same text
    # with a subset of the same independent ``AND`` fragments (tests/graphdb/test_neo4j_queries.py checks
    # that composition), so the 2**7 variants need not each cost a lint.
    keys = list(q.EXPERT_FILTER_CLAUSES)
    for combo in [(), *((k,) for k in keys), tuple(keys)]:
        query, params = q.find_experts_query({k: _SAMPLE_FILTER_VALUES[k] for k in combo}, limit=10)
        out.append((f"find_experts_query[{','.join(combo) or '-'}]", query, list(params)))
    for expert_id, prompt_id in itertools.product((None, "e"), (None, "p")):
        query, params = q.get_capabilities_query(expert_id, prompt_id)
        out.append((f"get_capabilities_query[{expert_id},{prompt_id}]", query, list(params)))
    for label in q.EXPERT_LABELS:
        out.append((f"upsert_experts_query[{label}]", q.upsert_experts_query(label), ["rows"]))
    return out


def saved_queries(path: Path = SAVED_QUERIES) -> list[tuple[str, str]]:
    """The Browser favourites in ``deploy/neo4j/saved_queries.cypher``: a ``// name`` line (more comment
    lines may follow), then a statement ending with ``;``; comment blocks followed by a blank line are
    headers."""
    out: list[tuple[str, str]] = []
    name, body = None, []
    for line in path.read_text(encoding="utf-8").splitlines():
        stripped = line.strip()
        if stripped.startswith("//") and not body:
            name = name or stripped[2:].strip()
            continue
        if not stripped and not body:
            name = None  # a comment block followed by a blank line is a header, not a statement's name
            continue
        body.append(line)
        if stripped.endswith(";"):
            if not name:
                raise ValueError(f"{path}: a saved query has no `// name` line: {body[0]!r}")
            out.append((f"saved:{name}", "\n".join(body).rstrip().rstrip(";")))
            name, body = None, []
    if body:
        raise ValueError(f"{path}: the last saved query does not end with ';'")
    return out


def all_queries() -> list[Statement]:
    """Constants, builder variants and saved Browser queries, each distinct text once."""
    seen: set[str] = set()
    out: list[Statement] = []
    for stmt in [*constant_queries(), *builder_queries(), *saved_queries()]:
        if stmt[1] not in seen:
            seen.add(stmt[1])
            out.append(stmt)
    return out


def main() -> int:
    """``python -m graphdb.neo4j.lint``: print every diagnostic; exit 1 if any is an error."""
    diagnostics = lint_queries(all_queries())
    for d in diagnostics:
        print(d)
    return 1 if any(d.severity == "error" for d in diagnostics) else 0


if __name__ == "__main__":
    raise SystemExit(main())
