"""Every Cypher statement of the Neo4j backend: UPPER_SNAKE constants and builders returning ``(query, params)``.

Rules this module keeps (CI lints every statement with Neo4j's parser, see ``graphdb/neo4j/lint.py``):

* Values only ever travel as ``$parameters``; nothing user-supplied is formatted into a query string.
* Labels, relationship types and property names are identifiers, which Cypher cannot parameterise: they are
  formatted in only through :func:`quote_identifier`, which accepts names from the allow-lists below and
  backtick-quotes them. Where a label varies (``:Checkpoint`` / ``:LoRA``) each variant is its own constant.
* Server-version variants (native vector index or brute force) are separate constants, never string surgery.
* Writes are ``UNWIND $rows ... MERGE`` on a unique key, so replaying a batch changes nothing.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from graphdb.store import NODE_LABELS, REL_TYPES

VECTOR_INDEX_NAME = "expert_embedding"
DEFAULT_EMBEDDING_DIM = 384
MAX_EMBEDDING_DIM = 4096  # Neo4j 5's vector index limit

# Node properties the backend writes or filters on (an identifier not listed here never reaches a query).
PROPERTY_KEYS = (
    "id", "name", "kind", "source", "base_family", "base_model", "embedding", "content_hash", "nsfw",
    "allow_commercial_use", "allow_derivatives", "creator", "tags", "calibrated_at", "ref_set_version",
    "scorer_version", "created_at", "updated_at", "popularity", "category", "text", "set_version", "prompt",
    "score", "coefficient", "record_hash", "commercial_use_ok",
)  # fmt: skip
EXPERT_LABELS = ("Checkpoint", "LoRA", "Embedding")  # the kind-specific second label of an :Expert


def quote_identifier(name: str, allowed: Iterable[str]) -> str:
    """Backtick-quote a label, relationship type or property name taken from an allow-list.

    Raises ``ValueError`` for a name outside ``allowed``: identifiers are never built from input.
    """
    if name not in tuple(allowed):
        raise ValueError(f"identifier {name!r} is not allowed in a Cypher statement")
    return "`" + name.replace("`", "``") + "`"


def _label(name: str) -> str:
    return quote_identifier(name, NODE_LABELS)


def _rel(name: str) -> str:
    return quote_identifier(name, REL_TYPES)


def _prop(name: str) -> str:
    return quote_identifier(name, PROPERTY_KEYS)


# --------------------------------------------------------------------------------------------- schema (DDL)

# (constraint name, label, property): one uniqueness constraint per node key.
_UNIQUE_KEYS = (
    ("expert_id", "Expert", "id"),
    ("ref_prompt_id", "RefPrompt", "id"),
    ("generation_id", "Generation", "id"),
    ("base_model_name", "BaseModel", "name"),
    ("tag_name", "Tag", "name"),
    ("creator_name", "Creator", "name"),
)
# (index name, label, property): range indexes for the filters ``find_experts``/``candidates`` use.
_RANGE_INDEXES = (
    ("expert_base_family", "Expert", "base_family"),
    ("expert_kind", "Expert", "kind"),
    ("expert_source", "Expert", "source"),
    ("expert_name", "Expert", "name"),
    ("ref_prompt_set_version", "RefPrompt", "set_version"),
)

CREATE_CONSTRAINT_QUERIES = tuple(
    f"CREATE CONSTRAINT {name} IF NOT EXISTS FOR (n:{_label(label)}) REQUIRE n.{_prop(prop)} IS UNIQUE"
    for name, label, prop in _UNIQUE_KEYS
)
CREATE_INDEX_QUERIES = tuple(
    f"CREATE INDEX {name} IF NOT EXISTS FOR (n:{_label(label)}) ON (n.{_prop(prop)})"
    for name, label, prop in _RANGE_INDEXES
)


def create_vector_index_query(dimensions: int = DEFAULT_EMBEDDING_DIM) -> tuple[str, dict[str, Any]]:
    """``CREATE VECTOR INDEX`` (Neo4j 5.15+) on ``Expert.embedding`` with cosine similarity.

    Index options are part of the DDL text; ``dimensions`` is validated as a bounded int before use.
    """
    dims = _check_dimensions(dimensions)
    query = (
        f"CREATE VECTOR INDEX {VECTOR_INDEX_NAME} IF NOT EXISTS FOR (e:{_label('Expert')}) ON (e.{_prop('embedding')}) "
        f"OPTIONS {{indexConfig: {{`vector.dimensions`: {dims}, `vector.similarity_function`: 'cosine'}}}}"
    )
    return query, {}


# Neo4j 5.11-5.14 created vector indexes with a procedure (not idempotent: callers check SHOW INDEXES first).
CREATE_VECTOR_INDEX_PROCEDURE_QUERY = (
    "CALL db.index.vector.createNodeIndex($index_name, 'Expert', 'embedding', $dimensions, 'cosine')"
)
SHOW_INDEX_QUERY = "SHOW INDEXES YIELD name, state WHERE name = $index_name RETURN name, state"
# The vector index with its options (``options.indexConfig['vector.dimensions']`` is its size).
SHOW_VECTOR_INDEX_QUERY = (
    "SHOW INDEXES YIELD name, state, options WHERE name = $index_name RETURN name, state, options"
)
# An index of the wrong size is dropped and created again at the stored embeddings' size.
DROP_VECTOR_INDEX_QUERY = f"DROP INDEX {VECTOR_INDEX_NAME} IF EXISTS"
AWAIT_INDEXES_QUERY = "CALL db.awaitIndexes($timeout_s)"
SERVER_VERSION_QUERY = "CALL dbms.components() YIELD name, versions, edition RETURN name, versions, edition"


def _check_dimensions(dimensions: int) -> int:
    if isinstance(dimensions, bool) or not isinstance(dimensions, int) or not 1 <= dimensions <= MAX_EMBEDDING_DIM:
        raise ValueError(f"vector index dimensions must be an int in 1..{MAX_EMBEDDING_DIM}, got {dimensions!r}")
    return dimensions


# --------------------------------------------------------------------------------------------- experts

STORED_EXPERT_STATE_QUERY = (
    "UNWIND $ids AS id\n"
    "MATCH (e:Expert {id: id})\n"
    "RETURN e.id AS id, e.content_hash AS content_hash, e.record_hash AS record_hash,\n"
    "       e.calibrated_at AS calibrated_at, e.ref_set_version AS ref_set_version,\n"
    "       e.scorer_version AS scorer_version"
)
# The one embedding dimension the graph stores (the first embedding written fixes it).
EMBEDDING_DIM_QUERY = (
    "MATCH (e:Expert) WHERE e.embedding IS NOT NULL RETURN size(e.embedding) AS dim LIMIT 1\n"
    "UNION\n"
    "MATCH (p:RefPrompt) WHERE p.embedding IS NOT NULL RETURN size(p.embedding) AS dim LIMIT 1"
)


def _upsert_experts_query(label: str) -> str:
    others = ":".join(_label(x) for x in EXPERT_LABELS if x != label)
    # ``row.props`` is the complete property map Python decided on (calibration fields included); a null
    # value removes the property. The kind label is swapped when an expert changes kind.
    return (
        "UNWIND $rows AS row\n"
        "MERGE (e:Expert {id: row.id})\n"
        f"SET e += row.props, e:{_label(label)}\n"
        f"REMOVE e:{others}\n"
        "RETURN count(e) AS written"
    )


UPSERT_CHECKPOINT_EXPERTS_QUERY = _upsert_experts_query("Checkpoint")
UPSERT_LORA_EXPERTS_QUERY = _upsert_experts_query("LoRA")
UPSERT_EMBEDDING_EXPERTS_QUERY = _upsert_experts_query("Embedding")  # textual inversions
_UPSERT_EXPERTS_BY_LABEL = {"Checkpoint": UPSERT_CHECKPOINT_EXPERTS_QUERY, "LoRA": UPSERT_LORA_EXPERTS_QUERY,
                            "Embedding": UPSERT_EMBEDDING_EXPERTS_QUERY}


def upsert_experts_query(label: str) -> str:
    """The upsert statement for experts of one kind label (``Checkpoint`` or ``LoRA``)."""
    if label not in _UPSERT_EXPERTS_BY_LABEL:
        raise ValueError(f"expert label must be one of {EXPERT_LABELS}, got {label!r}")
    return _UPSERT_EXPERTS_BY_LABEL[label]


DELETE_EXPERT_LINKS_QUERY = (
    "UNWIND $ids AS id\n"
    "MATCH (:Expert {id: id})-[r:BASED_ON|TAGGED|CREATED_BY]->()\n"
    "DELETE r"
)
LINK_BASE_MODELS_QUERY = (
    "UNWIND $rows AS row\n"
    "MATCH (e:Expert {id: row.id})\n"
    "MERGE (b:BaseModel {name: row.base_family})\n"
    "MERGE (e)-[:BASED_ON]->(b)"
)
LINK_TAGS_QUERY = (
    "UNWIND $rows AS row\n"
    "MATCH (e:Expert {id: row.id})\n"
    "UNWIND row.tags AS tag\n"
    "MERGE (t:Tag {name: tag})\n"
    "MERGE (e)-[:TAGGED]->(t)"
)
LINK_CREATORS_QUERY = (
    "UNWIND $rows AS row\n"
    "MATCH (e:Expert {id: row.id})\n"
    "MERGE (c:Creator {name: row.creator})\n"
    "MERGE (e)-[:CREATED_BY]->(c)"
)

GET_EXPERT_QUERY = "MATCH (e:Expert {id: $id}) RETURN properties(e) AS expert"
GET_EXPERTS_QUERY = "UNWIND $ids AS id MATCH (e:Expert {id: id}) RETURN properties(e) AS expert"
DELETE_EXPERT_QUERY = "MATCH (e:Expert {id: $id}) WITH e, e.id AS id DETACH DELETE e RETURN count(id) AS deleted"
MARK_CALIBRATED_QUERY = (
    "MATCH (e:Expert {id: $id})\n"
    "SET e.calibrated_at = $calibrated_at, e.ref_set_version = $ref_set_version,\n"
    "    e.scorer_version = $scorer_version\n"
    "RETURN e.id AS id"
)
MISSING_EXPERT_IDS_QUERY = (
    "UNWIND $ids AS id OPTIONAL MATCH (e:Expert {id: id}) WITH id, e WHERE e IS NULL RETURN collect(id) AS missing"
)

# find_experts: one WHERE fragment per ExpertFilter field, each with exactly the one parameter it names.
EXPERT_FILTER_CLAUSES: Mapping[str, str] = {
    "kind": "e.kind IN $kinds",
    "base_family": "e.base_family = $base_family",
    "source": "e.source = $source",
    "tag": "$tag IN e.tags",
    "creator": "e.creator = $creator",
    "uncalibrated_for": (
        "(e.calibrated_at IS NULL OR e.ref_set_version IS NULL OR e.ref_set_version <> $uncalibrated_for)"
    ),
    "name_contains": "toLower(e.name) CONTAINS toLower($name_contains)",
}
_FILTER_PARAM = {"kind": "kinds"}


def find_experts_query(filters: Mapping[str, Any], limit: int) -> tuple[str, dict[str, Any]]:
    """``MATCH (e:Expert)`` with the WHERE fragments of the given (non-None) filters, ordered by id.

    ``filters`` maps ``EXPERT_FILTER_CLAUSES`` keys to values (``kind`` takes the list of kind strings).
    """
    unknown = set(filters) - set(EXPERT_FILTER_CLAUSES)
    if unknown:
        raise ValueError(f"unknown expert filters: {sorted(unknown)}")
    params: dict[str, Any] = {"limit": int(limit)}
    clauses = []
    for key, clause in EXPERT_FILTER_CLAUSES.items():  # fixed order: one query text per filter combination
        if filters.get(key) is not None:
            clauses.append(clause)
            params[_FILTER_PARAM.get(key, key)] = filters[key]
    where = ("\nWHERE " + "\n  AND ".join(clauses)) if clauses else ""
    return f"MATCH (e:Expert){where}\nRETURN properties(e) AS expert\nORDER BY e.id\nLIMIT $limit", params


# --------------------------------------------------------------------------------------------- reference prompts

UPSERT_REF_PROMPTS_QUERY = (
    "UNWIND $rows AS row\n"
    "MERGE (p:RefPrompt {id: row.id})\n"
    "SET p += row.props\n"
    "RETURN count(p) AS written"
)
LIST_REF_PROMPTS_QUERY = "MATCH (p:RefPrompt) RETURN properties(p) AS prompt ORDER BY p.id"
LIST_REF_PROMPTS_BY_VERSION_QUERY = (
    "MATCH (p:RefPrompt) WHERE p.set_version = $set_version RETURN properties(p) AS prompt ORDER BY p.id"
)
MISSING_REF_PROMPT_IDS_QUERY = (
    "UNWIND $ids AS id OPTIONAL MATCH (p:RefPrompt {id: id}) WITH id, p WHERE p IS NULL RETURN collect(id) AS missing"
)

# --------------------------------------------------------------------------------------------- capabilities

# ``SET c = row.props`` replaces every property: the last calibration wins, stale metrics disappear.
WRITE_CAPABILITIES_QUERY = (
    "UNWIND $rows AS row\n"
    "MATCH (e:Expert {id: row.expert_id})\n"
    "MATCH (p:RefPrompt {id: row.prompt_id})\n"
    "MERGE (e)-[c:CAPABILITY]->(p)\n"
    "SET c = row.props\n"
    "RETURN count(c) AS written"
)


def get_capabilities_query(expert_id: str | None, prompt_id: str | None) -> tuple[str, dict[str, Any]]:
    """CAPABILITY edges, optionally of one expert and/or one reference prompt, ordered by (expert, prompt)."""
    clauses, params = [], {}
    if expert_id is not None:
        clauses.append("e.id = $expert_id")
        params["expert_id"] = expert_id
    if prompt_id is not None:
        clauses.append("p.id = $prompt_id")
        params["prompt_id"] = prompt_id
    where = ("\nWHERE " + " AND ".join(clauses)) if clauses else ""
    query = (
        f"MATCH (e:Expert)-[c:CAPABILITY]->(p:RefPrompt){where}\n"
        "RETURN e.id AS expert_id, p.id AS prompt_id, properties(c) AS capability\n"
        "ORDER BY expert_id, prompt_id"
    )
    return query, params


# --------------------------------------------------------------------------------------------- similarity

EXPERT_EMBEDDINGS_QUERY = (
    "MATCH (e:Expert) WHERE e.embedding IS NOT NULL\n"
    "RETURN e.id AS id, e.base_family AS base_family, e.embedding AS embedding\n"
    "ORDER BY id"
)
DELETE_SIMILAR_QUERY = "MATCH (:Expert)-[s:SIMILAR_TO]->(:Expert) DELETE s"
CREATE_SIMILAR_QUERY = (
    "UNWIND $rows AS row\n"
    "MATCH (a:Expert {id: row.src})\n"
    "MATCH (b:Expert {id: row.dst})\n"
    "CREATE (a)-[:SIMILAR_TO {score: row.score}]->(b)"
)
COUNT_EMBEDDED_EXPERTS_QUERY = "MATCH (e:Expert) WHERE e.embedding IS NOT NULL RETURN count(e) AS n"

# Shared by both candidate variants. Safety/licence filters are boolean parameters so there is one text.
_CANDIDATE_FILTERS = (
    "($kinds IS NULL OR e.kind IN $kinds)\n"
    "  AND ($base_family IS NULL OR e.base_family = $base_family)\n"
    "  AND ($allow_nsfw OR NOT coalesce(e.nsfw, false))\n"
    "  AND (NOT $require_commercial_use OR coalesce(e.commercial_use_ok, false))\n"
    "  AND (NOT $require_derivatives OR coalesce(e.allow_derivatives, true))\n"
    "  AND NOT e.id IN $exclude_ids"
)
# Neo4j 5.11+: approximate top-``$fetch`` from the vector index, then the filters; the caller widens
# ``$fetch`` when the filters leave fewer than ``$k``.
CANDIDATES_VECTOR_INDEX_QUERY = (
    "CALL db.index.vector.queryNodes($index_name, $fetch, $embedding) YIELD node AS e, score\n"
    f"WHERE {_CANDIDATE_FILTERS}\n"
    "RETURN properties(e) AS expert, score\n"
    "ORDER BY score DESC, e.id\n"
    "LIMIT $k"
)
# Older servers (or a query whose dimension differs from the index): exact cosine computed in Cypher.
CANDIDATES_BRUTE_FORCE_QUERY = (
    "MATCH (e:Expert)\n"
    "WHERE e.embedding IS NOT NULL AND size(e.embedding) = size($embedding)\n"
    f"  AND {_CANDIDATE_FILTERS}\n"
    "WITH e, reduce(dot = 0.0, i IN range(0, size($embedding) - 1) | dot + e.embedding[i] * $embedding[i]) AS dot,\n"
    "     reduce(sq = 0.0, x IN e.embedding | sq + x * x) AS sq\n"
    "WITH e, CASE WHEN sq = 0.0 THEN 0.0 ELSE dot / (sqrt(sq) * $query_norm) END AS score\n"
    "RETURN properties(e) AS expert, score\n"
    "ORDER BY score DESC, e.id\n"
    "LIMIT $k"
)

# --------------------------------------------------------------------------------------------- activation

ACTIVATION_CAPABILITIES_QUERY = (
    "UNWIND $ids AS id\n"
    "MATCH (e:Expert {id: id})-[c:CAPABILITY]->(p:RefPrompt)\n"
    "RETURN e.id AS expert_id, properties(p) AS prompt, properties(c) AS capability\n"
    "ORDER BY expert_id, p.id"
)
ACTIVATION_SIMILAR_QUERY = (
    "UNWIND $ids AS id\n"
    "MATCH (e:Expert {id: id})-[s:SIMILAR_TO]-(n:Expert)\n"
    "WITH DISTINCT s\n"
    "RETURN startNode(s).id AS src, endNode(s).id AS dst, s.score AS score\n"
    "ORDER BY src, dst"
)

# --------------------------------------------------------------------------------------------- generations

MERGE_GENERATION_QUERY = (
    "MERGE (g:Generation {id: $id})\n"
    # an explicit ``$created_at`` wins; otherwise the first recording's time is kept
    "SET g.prompt = $prompt, g.created_at = coalesce($created_at, g.created_at, $now)\n"
    "WITH g\n"
    "OPTIONAL MATCH (g)-[u:USED]->()\n"
    "DELETE u"
)
LINK_GENERATION_QUERY = (
    "MATCH (g:Generation {id: $id})\n"
    "UNWIND $used AS row\n"
    "MATCH (e:Expert {id: row.expert_id})\n"
    "MERGE (g)-[u:USED]->(e)\n"
    "SET u.coefficient = row.coefficient"
)

# --------------------------------------------------------------------------------------------- stats, wipe


def _count_union(items: Iterable[str], pattern: str) -> str:
    return "\nUNION ALL\n".join(pattern.format(q=q, name=name) for name, q in items)


NODE_COUNTS_QUERY = _count_union(
    ((label, _label(label)) for label in NODE_LABELS), "MATCH (n:{q}) RETURN '{name}' AS name, count(n) AS n"
)
RELATIONSHIP_COUNTS_QUERY = _count_union(
    ((rel, _rel(rel)) for rel in REL_TYPES), "MATCH ()-[r:{q}]->() RETURN '{name}' AS name, count(r) AS n"
)
# Test helper only: removes every node carrying one of DiffGraph's labels (never anything else).
# A token every write transaction renews: in-process caches keyed on it (the search corpus,
# ``graphdb/search.py``) see writes by any process. ``:Meta`` is internal: not in NODE_LABELS.
DATA_VERSION_QUERY = "MATCH (m:Meta {key: 'data_version'}) RETURN m.value AS value"
TOUCH_DATA_VERSION_QUERY = "MERGE (m:Meta {key: 'data_version'}) SET m.value = $data_version"

CLEAR_QUERY = "MATCH (n)\nWHERE " + " OR ".join(f"n:{_label(label)}" for label in NODE_LABELS) + "\nDETACH DELETE n"


def schema_queries(dimensions: int = DEFAULT_EMBEDDING_DIM) -> list[str]:
    """Constraints and range indexes (every server), then the 5.15+ vector index DDL."""
    return [*CREATE_CONSTRAINT_QUERIES, *CREATE_INDEX_QUERIES, create_vector_index_query(dimensions)[0]]
