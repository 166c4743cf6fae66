"""Every statement of the embedded backend (LadybugDB's Cypher dialect) and the table shapes they read/write.

Rules this module keeps (as ``graphdb/neo4j/queries.py`` does for Neo4j):

* Values only ever travel as ``$parameters`` or as typed arrow tables (``LOAD FROM $rows`` / ``COPY``).
* Table, relationship and column names are identifiers, which the engine cannot parameterise. Every
  statement is built once, at import, from the fixed tables below (checked by :func:`identifier`); at run
  time the store picks a finished statement from a dict keyed by name, so nothing is formatted per call.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from graphdb.store import REL_TYPES

# (column, DDL type, arrow type); the order is the COPY order (id first)
EXPERT_COLUMNS: tuple[tuple[str, str, pa.DataType], ...] = (
    ("id", "STRING", pa.string()),
    ("label", "STRING", pa.string()),
    ("source", "STRING", pa.string()),
    ("source_model_id", "STRING", pa.string()),
    ("source_version_id", "STRING", pa.string()),
    ("name", "STRING", pa.string()),
    ("version_name", "STRING", pa.string()),
    ("kind", "STRING", pa.string()),
    ("base_model", "STRING", pa.string()),
    ("base_family", "STRING", pa.string()),
    ("family_known", "BOOL", pa.bool_()),
    ("url", "STRING", pa.string()),
    ("description", "STRING", pa.string()),
    ("skill", "STRING", pa.string()),
    ("skills", "STRING[]", pa.list_(pa.string())),
    ("subjects", "STRING[]", pa.list_(pa.string())),
    ("styles", "STRING[]", pa.list_(pa.string())),
    ("trained_words", "STRING[]", pa.list_(pa.string())),
    ("tags", "STRING[]", pa.list_(pa.string())),
    ("creator", "STRING", pa.string()),
    ("nsfw", "BOOL", pa.bool_()),
    ("nsfw_level", "INT64", pa.int64()),
    ("license", "STRING", pa.string()),
    ("allow_commercial_use", "STRING", pa.string()),
    ("allow_derivatives", "BOOL", pa.bool_()),
    ("allow_no_credit", "BOOL", pa.bool_()),
    ("downloads", "INT64", pa.int64()),
    ("likes", "INT64", pa.int64()),
    ("rating", "DOUBLE", pa.float64()),
    ("popularity", "DOUBLE", pa.float64()),
    ("recommended_weight", "DOUBLE", pa.float64()),
    ("files", "STRING", pa.string()),  # JSON list of ExpertFile
    ("embedding", "FLOAT[]", pa.list_(pa.float32())),
    ("content_hash", "STRING", pa.string()),
    ("record_hash", "STRING", pa.string()),  # our hash of the whole record (change detection)
    # the record as JSON (without embedding and calibration fields): reads by id fetch this one column,
    # because random access costs about one column-chunk read per column
    ("record", "STRING", pa.string()),
    ("created_at", "STRING", pa.string()),  # ISO-8601
    ("updated_at", "STRING", pa.string()),
    ("calibrated_at", "STRING", pa.string()),
    ("ref_set_version", "STRING", pa.string()),
    ("scorer_version", "STRING", pa.string()),
)
EXPERT_SCHEMA = pa.schema([(name, typ) for name, _, typ in EXPERT_COLUMNS])
CAPABILITY_SCHEMA = pa.schema(
    [
        ("from", pa.string()),
        ("to", pa.string()),
        ("score", pa.float32()),
        ("metrics", pa.string()),
        ("n_images", pa.int64()),
        ("calibrated_at", pa.string()),
        ("ref_set_version", pa.string()),
    ]
)

NODE_TABLES = ("Expert", "BaseModel", "Tag", "Creator", "RefPrompt", "Generation", "Meta")
NAMED_TABLES = ("BaseModel", "Tag", "Creator")  # keyed by ``name``; the others by ``id`` (Meta by ``key``)
# relationship -> ((source table, key), (target table, key), property columns in COPY order)
RELATIONSHIPS: Mapping[str, tuple[tuple[str, str], tuple[str, str], tuple[str, ...]]] = {
    "BASED_ON": (("Expert", "id"), ("BaseModel", "name"), ()),
    "TAGGED": (("Expert", "id"), ("Tag", "name"), ()),
    "CREATED_BY": (("Expert", "id"), ("Creator", "name"), ()),
    "CAPABILITY": (
        ("Expert", "id"),
        ("RefPrompt", "id"),
        ("score", "metrics", "n_images", "calibrated_at", "ref_set_version"),
    ),
    "SIMILAR_TO": (("Expert", "id"), ("Expert", "id"), ("score",)),
    "USED": (("Generation", "id"), ("Expert", "id"), ("coefficient",)),
}
LINKS = (("BASED_ON", "BaseModel"), ("TAGGED", "Tag"), ("CREATED_BY", "Creator"))
_COLUMNS = tuple(name for name, _, _ in EXPERT_COLUMNS)
_IDENTIFIERS = frozenset(
    {*NODE_TABLES, *RELATIONSHIPS, *_COLUMNS, "name", "key", "value", "category", "text", "set_version",
     "prompt", "coefficient", "score", "metrics", "n_images"}
)  # fmt: skip


def identifier(name: str) -> str:
    """A table, relationship or column name from the allow-lists above, else ``ValueError``."""
    if name not in _IDENTIFIERS or not name.replace("_", "").isalnum():
        raise ValueError(f"identifier {name!r} is not allowed in a statement")
    return name


# --------------------------------------------------------------------------------------------- schema (DDL)

SCHEMA_DDL = (
    "CREATE NODE TABLE IF NOT EXISTS Expert("
    + ", ".join(f"{identifier(name)} {ddl}" for name, ddl, _ in EXPERT_COLUMNS)
    + ", PRIMARY KEY(id))",
    "CREATE NODE TABLE IF NOT EXISTS BaseModel(name STRING, PRIMARY KEY(name))",
    "CREATE NODE TABLE IF NOT EXISTS Tag(name STRING, PRIMARY KEY(name))",
    "CREATE NODE TABLE IF NOT EXISTS Creator(name STRING, PRIMARY KEY(name))",
    "CREATE NODE TABLE IF NOT EXISTS RefPrompt(id STRING, category STRING, text STRING, set_version STRING,"
    " source STRING, embedding FLOAT[], PRIMARY KEY(id))",
    "CREATE NODE TABLE IF NOT EXISTS Generation(id STRING, prompt STRING, created_at STRING, PRIMARY KEY(id))",
    "CREATE NODE TABLE IF NOT EXISTS Meta(key STRING, value STRING, PRIMARY KEY(key))",
    "CREATE REL TABLE IF NOT EXISTS BASED_ON(FROM Expert TO BaseModel)",
    "CREATE REL TABLE IF NOT EXISTS TAGGED(FROM Expert TO Tag)",
    "CREATE REL TABLE IF NOT EXISTS CREATED_BY(FROM Expert TO Creator)",
    "CREATE REL TABLE IF NOT EXISTS CAPABILITY(FROM Expert TO RefPrompt, score FLOAT, metrics STRING,"
    " n_images INT64, calibrated_at STRING, ref_set_version STRING)",
    "CREATE REL TABLE IF NOT EXISTS SIMILAR_TO(FROM Expert TO Expert, score FLOAT)",
    "CREATE REL TABLE IF NOT EXISTS USED(FROM Generation TO Expert, coefficient DOUBLE)",
)

# --------------------------------------------------------------------------------------------- metadata

EMBEDDING_DIM_QUERY = "MATCH (m:Meta {key: 'embedding_dim'}) RETURN m.value"
SET_EMBEDDING_DIM_QUERY = "MERGE (m:Meta {key: 'embedding_dim'}) SET m.value = $v"
# renewed by every write transaction: cached banks compare it to know they are stale
DATA_VERSION_QUERY = "MATCH (m:Meta {key: 'data_version'}) RETURN m.value"
RENEW_DATA_VERSION_QUERY = "MERGE (m:Meta {key: 'data_version'}) SET m.value = $v"

# --------------------------------------------------------------------------------------------- lookups by id


@dataclass(frozen=True)
class ByIdQuery:
    """One lookup in its two forms: ``one`` binds ``$id`` (a cached primary-key lookup, ~0.1 ms), ``many``
    unwinds ``$ids`` (a hash join over a scan of the whole table, ~15 ms at 100k nodes)."""

    one: str
    many: str


def _by_id(pattern: str, returns: str) -> ByIdQuery:
    return ByIdQuery(
        one=f"MATCH {pattern} RETURN {returns}",
        many=f"UNWIND $ids AS i MATCH {pattern.replace('$id', 'i')} RETURN {returns}",
    )


EXPERT_STATE = _by_id(
    "(e:Expert {id: $id})",
    "e.id, e.content_hash, e.record_hash, e.calibrated_at, e.ref_set_version, e.scorer_version",
)
EXPERT_STATE_COLUMNS = (
    "id",
    "content_hash",
    "record_hash",
    "calibrated_at",
    "ref_set_version",
    "scorer_version",
)
EXPERT_RECORD_ROW = _by_id(
    "(e:Expert {id: $id})", "e.id, e.record, e.calibrated_at, e.ref_set_version, e.scorer_version"
)
EXPERT_RECORD_ROW_COLUMNS = ("id", "record", "calibrated_at", "ref_set_version", "scorer_version")
EXPERT_RECORD = _by_id("(e:Expert {id: $id})", "e.id, e.record")
EXISTING_IDS: Mapping[str, ByIdQuery] = {
    "Expert": _by_id("(n:Expert {id: $id})", "n.id"),
    "RefPrompt": _by_id("(n:RefPrompt {id: $id})", "n.id"),
}
CAPABILITY_PAIRS = _by_id("(a:Expert {id: $id})-[c:CAPABILITY]->(b:RefPrompt)", "a.id, b.id")
SIMILAR_OUT = _by_id("(a:Expert {id: $id})-[s:SIMILAR_TO]->(b:Expert)", "a.id, b.id, s.score")
SIMILAR_IN = _by_id("(b:Expert)-[s:SIMILAR_TO]->(a:Expert {id: $id})", "b.id, a.id, s.score")
ACTIVATION_CAPABILITIES = _by_id(
    "(a:Expert {id: $id})-[c:CAPABILITY]->(p:RefPrompt)", "a.id, p.id, c.score, c.metrics"
)

# --------------------------------------------------------------------------------------------- writes

# ``COPY <table> FROM $rows`` per table: bulk appends (node tables: id first; rel tables: from, to)
COPY_QUERIES: Mapping[str, str] = {
    name: f"COPY {identifier(name)} FROM $rows" for name in ("Expert", *RELATIONSHIPS)
}


def _load_rels_query(rel: str) -> str:
    (src, src_key), (dst, dst_key), props = RELATIONSHIPS[rel]
    body = (" {" + ", ".join(f"{identifier(p)}: c_{p}" for p in props) + "}") if props else ""
    return (
        f"LOAD FROM $rows MATCH (a:{identifier(src)} {{{identifier(src_key)}: c_from}}) "
        f"MATCH (b:{identifier(dst)} {{{identifier(dst_key)}: c_to}}) "
        f"CREATE (a)-[:{identifier(rel)}{body}]->(b)"
    )


# small relationship batches: match both endpoints per row (columns renamed ``c_<name>``)
LOAD_RELS_QUERIES: Mapping[str, str] = {rel: _load_rels_query(rel) for rel in RELATIONSHIPS}
MERGE_NAMED_QUERIES: Mapping[str, str] = {
    table: f"LOAD FROM $rows MERGE (n:{identifier(table)} {{name: c_name}})" for table in NAMED_TABLES
}
UPSERT_EXPERTS_QUERY = "LOAD FROM $rows MERGE (e:Expert {id: c_id}) SET " + ", ".join(
    f"e.{identifier(name)} = c_{name}" for name in _COLUMNS if name != "id"
)
DELETE_EXPERT_LINKS_QUERY = (
    "UNWIND $ids AS i MATCH (e:Expert {id: i})-[r:BASED_ON|TAGGED|CREATED_BY]->() DELETE r"
)
DELETE_EXPERT_QUERY = "MATCH (e:Expert {id: $id}) DETACH DELETE e"
MARK_CALIBRATED_QUERY = (
    "MATCH (e:Expert {id: $id}) SET e.calibrated_at = $at, e.ref_set_version = $rsv, e.scorer_version = $sv"
)
UPSERT_REF_PROMPTS_QUERY = (
    "LOAD FROM $rows MERGE (p:RefPrompt {id: c_id}) SET p.category = c_category, p.text = c_text, "
    "p.set_version = c_set_version, p.source = c_source, p.embedding = c_embedding"
)
# per expert, the plan walks that expert's own edges only
DELETE_EXPERT_CAPABILITIES_QUERY = (
    "MATCH (a:Expert {id: $id})-[c:CAPABILITY]->(b:RefPrompt) WHERE list_contains($pids, b.id) DELETE c"
)
DELETE_CAPABILITIES_BULK_QUERY = (
    "LOAD FROM $rows MATCH (a:Expert {id: c_expert})-[c:CAPABILITY]->(b:RefPrompt) "
    "WHERE list_contains(c_prompts, b.id) DELETE c"
)
DELETE_SIMILAR_QUERY = "MATCH (:Expert)-[s:SIMILAR_TO]->(:Expert) DELETE s"
MERGE_GENERATION_QUERY = (
    "MERGE (g:Generation {id: $id}) ON CREATE SET g.created_at = $at SET g.prompt = $prompt"
)
SET_GENERATION_CREATED_QUERY = "MATCH (g:Generation {id: $id}) SET g.created_at = $at"
DELETE_GENERATION_USED_QUERY = "MATCH (g:Generation {id: $id})-[u:USED]->() DELETE u"

# --------------------------------------------------------------------------------------------- reads

EXPERT_READ = (
    "e.record AS record, e.calibrated_at AS calibrated_at, e.ref_set_version AS ref_set_version, "
    "e.scorer_version AS scorer_version, e.embedding AS embedding"
)
GET_EXPERT_QUERY = f"MATCH (e:Expert {{id: $id}}) RETURN {EXPERT_READ}"

# find_experts: one WHERE fragment per ExpertFilter field, each with exactly the one parameter it names
# (``kind`` filters on the label, which groups every adapter kind)
EXPERT_FILTER_CLAUSES: Mapping[str, str] = {
    "kind": "e.label = $kind",
    "base_family": "e.base_family = $base_family",
    "source": "e.source = $source",
    "tag": "list_contains(e.tags, $tag)",
    "creator": "e.creator = $creator",
    "uncalibrated_for": (
        "(e.calibrated_at IS NULL OR e.ref_set_version IS NULL OR e.ref_set_version <> $uncalibrated_for)"
    ),
    "name_contains": "lower(e.name) CONTAINS lower($name_contains)",
}


def find_experts_query(filters: Mapping[str, Any], limit: int) -> tuple[str, dict[str, Any]]:
    """``MATCH (e:Expert)`` with the WHERE fragments of the given (non-None) filters, ordered by id."""
    unknown = set(filters) - set(EXPERT_FILTER_CLAUSES)
    if unknown:
        raise ValueError(f"unknown expert filters: {sorted(unknown)}")
    params: dict[str, Any] = {"limit": int(limit)}
    clauses = []
    for key, clause in EXPERT_FILTER_CLAUSES.items():  # fixed order: one query text per filter combination
        if filters.get(key) is not None:
            clauses.append(clause)
            params[key] = filters[key]
    where = (" WHERE " + " AND ".join(clauses)) if clauses else ""
    return f"MATCH (e:Expert){where} RETURN {EXPERT_READ} ORDER BY e.id LIMIT $limit", params


_REF_PROMPT_READ = (
    "RETURN p.id AS id, p.category AS category, p.text AS text, p.set_version AS set_version, "
    "p.source AS source, p.embedding AS embedding ORDER BY p.id"
)
LIST_REF_PROMPTS_QUERY = f"MATCH (p:RefPrompt) {_REF_PROMPT_READ}"
LIST_REF_PROMPTS_BY_VERSION_QUERY = f"MATCH (p:RefPrompt) WHERE p.set_version = $v {_REF_PROMPT_READ}"


def _capabilities_query(expert_pattern: str, prompt_pattern: str) -> str:
    return (
        f"MATCH {expert_pattern}-[c:CAPABILITY]->{prompt_pattern} RETURN a.id AS expert_id, "
        "b.id AS prompt_id, c.score AS score, c.metrics AS metrics, c.n_images AS n_images, "
        "c.calibrated_at AS calibrated_at, c.ref_set_version AS ref_set_version ORDER BY a.id, b.id"
    )


# (by expert, by prompt) -> query; property patterns use the primary-key index
_CAPABILITIES_QUERIES = {
    (False, False): _capabilities_query("(a:Expert)", "(b:RefPrompt)"),
    (True, False): _capabilities_query("(a:Expert {id: $eid})", "(b:RefPrompt)"),
    (False, True): _capabilities_query("(a:Expert)", "(b:RefPrompt {id: $pid})"),
    (True, True): _capabilities_query("(a:Expert {id: $eid})", "(b:RefPrompt {id: $pid})"),
}


def get_capabilities_query(expert_id: str | None, prompt_id: str | None) -> tuple[str, dict[str, Any]]:
    """CAPABILITY edges, optionally of one expert and/or one reference prompt, ordered by (expert, prompt)."""
    params = {k: v for k, v in (("eid", expert_id), ("pid", prompt_id)) if v is not None}
    return _CAPABILITIES_QUERIES[(expert_id is not None, prompt_id is not None)], params


EXPERT_EMBEDDINGS_QUERY = (
    "MATCH (e:Expert) WHERE e.embedding IS NOT NULL RETURN e.id AS id, e.base_family AS family, "
    "e.embedding AS embedding ORDER BY e.id"
)
# the retrieval bank: every embedded expert with the columns candidates() filters on
BANK_QUERY = (
    "MATCH (e:Expert) WHERE e.embedding IS NOT NULL RETURN e.id AS id, e.embedding AS embedding, "
    "e.label AS label, e.base_family AS family, e.nsfw AS nsfw, e.allow_commercial_use AS commercial, "
    "e.allow_derivatives AS derivatives, e.kind AS kind, e.name AS name, e.popularity AS popularity"
)
PROMPT_BANK_QUERY = (
    "MATCH (p:RefPrompt) RETURN p.id AS id, p.category AS category, p.text AS text, "
    "p.embedding AS embedding ORDER BY id"
)


def _counts(items: Iterable[str], pattern: str) -> dict[str, str]:
    return {name: pattern.format(identifier(name)) for name in items}


NODE_COUNT_QUERIES = _counts(
    ("Expert", "BaseModel", "Tag", "Creator", "RefPrompt", "Generation"), "MATCH (n:{}) RETURN count(n)"
)
EXPERT_LABEL_COUNTS_QUERY = "MATCH (e:Expert) RETURN e.label, count(e)"
REL_COUNT_QUERIES = _counts(REL_TYPES, "MATCH ()-[r:{}]->() RETURN count(r)")


def all_statements() -> list[str]:
    """Every finished statement of this module (for tests: no statement is left unparsed)."""
    out: list[str] = [
        *SCHEMA_DDL,
        *COPY_QUERIES.values(),
        *LOAD_RELS_QUERIES.values(),
        *MERGE_NAMED_QUERIES.values(),
    ]
    for value in list(globals().values()):
        if isinstance(value, ByIdQuery):
            out += [value.one, value.many]
    out += [q for m in (EXISTING_IDS,) for b in m.values() for q in (b.one, b.many)]
    out += [v for k, v in globals().items() if k.endswith("_QUERY") and isinstance(v, str)]
    out += (
        list(_CAPABILITIES_QUERIES.values())
        + list(NODE_COUNT_QUERIES.values())
        + list(REL_COUNT_QUERIES.values())
    )
    return out
