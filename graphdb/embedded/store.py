"""``EmbeddedGraphStore``: the ``GraphStore`` contract on an embedded, file-backed LadybugDB database.

Tables mirror the Neo4j schema (one node table per label; ``Expert.label`` says Checkpoint or LoRA).
Writes go through typed arrow tables (``LOAD FROM`` / ``COPY FROM``), never through string-built
values. Engine facts that shape the code (measured with real-ladybug 0.15.3, 100k experts):

* ``MERGE`` of a relationship inside ``UNWIND`` crashes, so idempotent edge batches are written as
  delete-then-create inside one transaction;
* matching both endpoints per row does not scale, so batches of at least ``bulk_threshold`` rows
  append with ``COPY <table> FROM <arrow>`` instead;
* ``UNWIND $ids ... MATCH (n {id: i})`` is a hash join over a scan of the whole table (~15 ms), while a
  cached single-id lookup is ~0.1 ms, so small id lists are looked up one by one (``_by_id``);
* random access to a list or long string column reads whole column chunks, so embeddings for
  retrieval and activation come from an in-memory bank (one bulk arrow read per data version) and an
  expert is read back from one JSON ``record`` column.

Candidate retrieval is brute-force cosine over that bank, sliced per (kind group, family). The bank is
shared by stores on the same path in this process and revalidated against a ``data_version`` token
that every write transaction renews, so writes by any process invalidate it.
"""

from __future__ import annotations

import hashlib
import json
import math
import uuid
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import numpy as np
import pyarrow as pa

from core.settings import Settings
from core.types import Capability, Expert, ExpertKind, NotFoundError, RefPrompt, utcnow
from graphdb.embedded.engine import Engine
from graphdb.search import ALL_EXPERTS, SearchCorpus, cached_corpus
from graphdb.store import (
    REL_TYPES,
    Candidate,
    CandidateFilter,
    ExpertFilter,
    GraphError,
    GraphStats,
    UpsertResult,
    check_vector,
    commercial_use_ok,
    unique_capabilities,
    unique_experts,
)
from graphdb.subgraph import Subgraph, SubgraphEdge, SubgraphNode

DEFAULT_DIM = 384
SCORE_DECIMALS = 6  # CAPABILITY/SIMILAR_TO scores are 32-bit floats (bulk COPY is 2.5x faster than DOUBLE)
_CALIBRATION_FIELDS = ("calibrated_at", "ref_set_version", "scorer_version")

# (column, DDL type, arrow type); the order is the COPY order (id first)
_EXPERT_COLUMNS: tuple[tuple[str, str, pa.DataType], ...] = (
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
_EXPERT_SCHEMA = pa.schema([(name, typ) for name, _, typ in _EXPERT_COLUMNS])
_EXPERT_READ_ROW = "e.id, e.record, e.calibrated_at, e.ref_set_version, e.scorer_version"
_EXPERT_READ = (
    "e.record AS record, e.calibrated_at AS calibrated_at, e.ref_set_version AS ref_set_version, "
    "e.scorer_version AS scorer_version"
)
_LIST_FIELDS = ("skills", "subjects", "styles", "trained_words", "tags")
_DATE_FIELDS = ("created_at", "updated_at", "calibrated_at")

_SCHEMA_DDL = (
    "CREATE NODE TABLE IF NOT EXISTS Expert("
    + ", ".join(f"{name} {ddl}" for name, ddl, _ in _EXPERT_COLUMNS)
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

_CAPABILITY_SCHEMA = pa.schema(
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
_PAIR_SCHEMA = pa.schema([("from", pa.string()), ("to", pa.string())])
_LINKS = (("BASED_ON", "BaseModel"), ("TAGGED", "Tag"), ("CREATED_BY", "Creator"))


@dataclass
class _Bank:
    """Every expert embedding of one data version, rows sorted by id, with the columns retrieval filters on.

    Shared by every store on the same path in this process and revalidated against the database's
    ``data_version`` token, so writes by any process invalidate it.
    """

    version: str
    ids: np.ndarray  # object array of ids, sorted
    matrix: np.ndarray  # float32 rows as stored
    inv_norms: np.ndarray  # 1 / L2 norm of each row
    labels: np.ndarray
    families: np.ndarray
    nsfw: np.ndarray
    commercial: np.ndarray
    derivatives: np.ndarray
    nodes: dict[str, SubgraphNode]  # activation node of each expert in the bank
    slices: dict[tuple[str | None, str | None], tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    """(kind group, family) -> (rows, contiguous L2-normalised sub-matrix)"""

    def rows_of(self, ids: Sequence[str]) -> np.ndarray:
        """Row of each id, -1 where the expert has no embedding."""
        if len(self.ids) == 0:
            return np.full(len(ids), -1)
        wanted = np.asarray(list(ids), dtype=object)
        pos = np.clip(np.searchsorted(self.ids, wanted), 0, len(self.ids) - 1)
        return np.where(self.ids[pos] == wanted, pos, -1)

    def slice(self, group: str | None, family: str | None) -> tuple[np.ndarray, np.ndarray]:
        """Rows and a contiguous sub-matrix of one (kind group, family) slice (cached)."""
        key = (group, family)
        if key not in self.slices:
            mask = np.ones(len(self.ids), dtype=bool)
            if group is not None:
                mask &= self.labels == group
            if family is not None:
                mask &= self.families == family
            rows = np.nonzero(mask)[0]
            self.slices[key] = (rows, self.matrix[rows] * self.inv_norms[rows, None])
        return self.slices[key]


@dataclass
class _PromptBank:
    version: str
    ids: list[str]
    matrix: np.ndarray
    rows: dict[str, dict[str, str]]

    @property
    def position(self) -> dict[str, int]:
        return {p: n for n, p in enumerate(self.ids)}


_BANKS: dict[str, _Bank] = {}
_PROMPT_BANKS: dict[str, _PromptBank] = {}
_PER_ID_MAX = 128  # above this many ids, one UNWIND query beats per-id primary-key lookups
_MAX_CACHED_PATHS = 4  # banks outlive a store (sessions are short) but only for a few databases


def _remember(cache: dict[str, Any], path: str, bank: Any) -> None:
    cache.pop(path, None)
    cache[path] = bank
    while len(cache) > _MAX_CACHED_PATHS:
        cache.pop(next(iter(cache)))


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def _parse_dt(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value) if value else None


def _kind_group(kind: ExpertKind | str | None) -> str | None:
    """``None`` (all), ``"Checkpoint"`` or ``"LoRA"`` (every adapter kind)."""
    if kind is None or kind == "":
        return None
    try:
        return ExpertKind(str(kind).lower()).label
    except ValueError as exc:
        raise GraphError(f"unknown expert kind {kind!r}; use one of {[k.value for k in ExpertKind]}") from exc


def _record_json(expert: Expert) -> str:
    return json.dumps(
        expert.model_dump(mode="json", exclude={*_CALIBRATION_FIELDS, "embedding"}), sort_keys=True
    )


def _record_hash(record: str, embedding: list[float] | None) -> str:
    digest = hashlib.sha256(record.encode())
    if embedding:
        digest.update(np.asarray(embedding, dtype=np.float32).tobytes())
    return digest.hexdigest()


def _expert_row(expert: Expert) -> dict[str, Any]:
    """One Expert table row: every field as its own column (readable, filterable) plus the JSON record."""
    row = expert.model_dump(mode="python", exclude={"files", "embedding", "kind", *_DATE_FIELDS})
    record = _record_json(expert)
    row.update(
        label=expert.label,
        kind=expert.kind.value,
        files=json.dumps([f.model_dump(mode="json") for f in expert.files]),
        embedding=list(np.asarray(expert.embedding, dtype=np.float32)) if expert.embedding else None,
        record=record,
        record_hash=_record_hash(record, expert.embedding),
        **{name: _iso(getattr(expert, name)) for name in _DATE_FIELDS},
    )
    return row


def _expert_from_row(row: dict[str, Any], embedding: list[float] | None = None) -> Expert:
    """Rebuild an Expert from ``_EXPERT_READ`` columns (+ ``embedding`` column or the given vector)."""
    data = json.loads(row["record"])
    emb = row.get("embedding", embedding)
    data.update(
        embedding=[float(x) for x in emb] if emb else None,
        calibrated_at=_parse_dt(row["calibrated_at"]),
        ref_set_version=row["ref_set_version"] or "",
        scorer_version=row["scorer_version"] or "",
    )
    return Expert.model_validate(data)


def _embedding_matrix(column: pa.ChunkedArray | pa.Array, dim: int) -> np.ndarray:
    """One float32 row per list value; null or wrongly-sized lists become zero rows (bulk, no Python loop
    unless some rows are missing)."""
    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    out = np.zeros((len(column), dim), dtype=np.float32)
    row = 0
    for chunk in chunks:
        n = len(chunk)
        if n == 0:
            continue
        lengths = chunk.value_lengths().fill_null(0).to_numpy(zero_copy_only=False)
        flat = chunk.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
        if np.all(lengths == dim):
            out[row : row + n] = flat.reshape(n, dim)
        else:
            starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
            for j in np.nonzero(lengths == dim)[0]:
                out[row + j] = flat[starts[j] : starts[j] + dim]
        row += n
    return out


def _normalise(matrix: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    return matrix / np.maximum(norms, 1e-12)


def _top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` best finite scores, best first; ties keep index order (rows are id-sorted).

    Scores are compared at 6 decimals: BLAS may round identical rows differently in the last bit.
    """
    scores = np.round(scores, 6)
    valid = np.nonzero(np.isfinite(scores))[0]
    if valid.size == 0 or k <= 0:
        return valid[:0]
    if valid.size > k:
        part = valid[np.argpartition(-scores[valid], k - 1)[:k]]
        threshold = scores[part].min()
        valid = valid[scores[valid] >= threshold]  # every tie at the boundary, then order decides
    order = np.lexsort((valid, -scores[valid]))
    return valid[order][:k]


class EmbeddedGraphStore:
    """``GraphStore`` on LadybugDB. Holds the database (one process at a time) until ``close()``."""

    def __init__(
        self,
        path: str,
        settings: Settings | None = None,
        *,
        lock_timeout_s: float = 30.0,
        bulk_threshold: int = 2000,
    ) -> None:
        self.settings = settings
        self.bulk_threshold = max(1, bulk_threshold)
        self._engine = Engine(path, lock_timeout_s=lock_timeout_s)
        try:
            self.ensure_schema()
        except BaseException:
            self._engine.close()
            raise

    @property
    def path(self) -> str:
        return self._engine.path

    # lifecycle ---------------------------------------------------------------------------------
    def ensure_schema(self) -> None:
        """Create every node and relationship table if missing (idempotent)."""
        for statement in _SCHEMA_DDL:
            self._engine.execute(statement)

    def close(self) -> None:
        self._engine.close()

    def __enter__(self) -> EmbeddedGraphStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # helpers -----------------------------------------------------------------------------------
    def _embedding_dim(self) -> int | None:
        rows = self._engine.execute("MATCH (m:Meta {key: 'embedding_dim'}) RETURN m.value")
        return int(rows[0][0]) if rows else None

    def _claim_dim(self, dims: Iterable[tuple[str, int]]) -> None:
        """All embeddings in the graph share one dimension: the first write fixes it (checked before writing)."""
        stored = self._embedding_dim()
        expected = stored
        for owner, dim in dims:
            if expected is None:
                expected = dim
            elif dim != expected:
                raise GraphError(f"{owner}: embedding has {dim} dimensions, the graph stores {expected}")
        if stored is None and expected is not None:
            self._engine.execute(
                "MERGE (m:Meta {key: 'embedding_dim'}) SET m.value = $v", {"v": str(expected)}
            )

    def _by_id(self, pattern: str, returns: str, ids: Sequence[str], **params: Any) -> list[list[Any]]:
        """Rows of ``MATCH <pattern> RETURN <returns>`` for each id (``pattern`` binds ``$id``).

        Few ids: one cached primary-key lookup per id (~0.1 ms each). Many ids: one ``UNWIND`` query,
        which the engine runs as a hash join over a scan of the whole table (~15 ms at 100k nodes).
        """
        ids = list(ids)
        if len(ids) > _PER_ID_MAX:
            query = f"UNWIND $ids AS i MATCH {pattern.replace('$id', 'i')} RETURN {returns}"
            return self._engine.execute(query, {"ids": ids, **params})
        query = f"MATCH {pattern} RETURN {returns}"
        rows: list[list[Any]] = []
        for one in ids:
            rows.extend(self._engine.execute(query, {"id": one, **params}))
        return rows

    def _existing(self, table: str, ids: Sequence[str]) -> set[str]:
        key = "name" if table in {"BaseModel", "Tag", "Creator"} else "id"
        return {r[0] for r in self._by_id(f"(n:{table} {{{key}: $id}})", f"n.{key}", ids)}

    def _require(self, table: str, ids: Iterable[str], what: str) -> None:
        wanted = sorted(set(ids))
        missing = sorted(set(wanted) - self._existing(table, wanted))
        if missing:
            shown = ", ".join(repr(m) for m in missing[:10])
            more = f" and {len(missing) - 10} more" if len(missing) > 10 else ""
            raise NotFoundError(f"unknown {what}{'s' if len(missing) > 1 else ''}: {shown}{more}")

    def _read_experts(self, match: str, params: dict[str, Any]) -> list[Expert]:
        table = self._engine.arrow(f"{match} RETURN {_EXPERT_READ}, e.embedding AS embedding", params)
        return [_expert_from_row(row) for row in table.to_pylist()]

    def _experts_by_id(self, ids: Sequence[str], bank: _Bank) -> dict[str, Expert]:
        """Experts by id: fields by primary-key lookup, embeddings from the (fresh) bank."""
        columns = ("id", "record", "calibrated_at", "ref_set_version", "scorer_version")
        rows = [
            dict(zip(columns, r, strict=True))
            for r in self._by_id("(e:Expert {id: $id})", _EXPERT_READ_ROW, ids)
        ]
        positions = bank.rows_of([r["id"] for r in rows])
        return {
            row["id"]: _expert_from_row(row, bank.matrix[pos].tolist() if pos >= 0 else None)
            for row, pos in zip(rows, positions, strict=True)
        }

    def _write_rels(self, rel: str, table: pa.Table, src: tuple[str, str], dst: tuple[str, str]) -> None:
        """Append relationships: ``COPY`` for big batches, per-row endpoint match for small ones."""
        if table.num_rows == 0:
            return
        if table.num_rows >= self.bulk_threshold:
            self._engine.copy(rel, table)
            return
        props = [name for name in table.column_names if name not in {"from", "to"}]
        renamed = table.rename_columns([f"c_{name}" for name in table.column_names])
        body = ", ".join(f"{name}: c_{name}" for name in props)
        self._engine.load(
            f"LOAD FROM $rows MATCH (a:{src[0]} {{{src[1]}: c_from}}) MATCH (b:{dst[0]} {{{dst[1]}: c_to}}) "
            f"CREATE (a)-[:{rel} {{{body}}}]->(b)",
            renamed,
        )

    # experts -----------------------------------------------------------------------------------
    def upsert_experts(self, experts: Sequence[Expert]) -> UpsertResult:
        """Create or update experts and replace their BASED_ON/TAGGED/CREATED_BY links.

        Counts by ``content_hash``; a changed hash clears stored calibration fields (the expert needs
        recalibration) unless the incoming record sets them.
        """
        batch = unique_experts(experts)
        if not batch:
            return UpsertResult()
        ids = list(batch)
        columns = ("id", "content_hash", "record_hash", "calibrated_at", "ref_set_version", "scorer_version")
        stored = {
            r[0]: dict(zip(columns, r, strict=True))
            for r in self._by_id(
                "(e:Expert {id: $id})",
                "e.id, e.content_hash, e.record_hash, e.calibrated_at, e.ref_set_version, e.scorer_version",
                ids,
            )
        }
        new_rows: list[dict[str, Any]] = []
        changed_rows: list[dict[str, Any]] = []
        created: list[str] = []
        updated: list[str] = []
        unchanged = 0
        for expert_id, expert in batch.items():
            old = stored.get(expert_id)
            if old is not None:
                hash_changed = (old["content_hash"] or "") != expert.content_hash
                keep = (
                    {}
                    if hash_changed
                    else {
                        "calibrated_at": _parse_dt(old["calibrated_at"]),
                        "ref_set_version": old["ref_set_version"] or "",
                        "scorer_version": old["scorer_version"] or "",
                    }
                )
                update = {k: v for k, v in keep.items() if not getattr(expert, k)}
                expert = expert.model_copy(update=update) if update else expert
            row = _expert_row(expert)
            digest = row["record_hash"]
            if old is None:
                new_rows.append(row)
                created.append(expert_id)
                continue
            same_record = old["record_hash"] == digest
            if (expert.content_hash and not hash_changed) or (not expert.content_hash and same_record):
                unchanged += 1
            else:
                updated.append(expert_id)
            same_calibration = all(
                row[k] == (old[k] or ("" if k != "calibrated_at" else None)) for k in _CALIBRATION_FIELDS
            )
            if not (same_record and same_calibration):
                changed_rows.append(row)
        self._claim_dim(
            (f"expert {r['id']!r}", len(r["embedding"])) for r in [*new_rows, *changed_rows] if r["embedding"]
        )
        with self._write():
            if len(new_rows) >= self.bulk_threshold:
                self._engine.copy("Expert", pa.Table.from_pylist(new_rows, schema=_EXPERT_SCHEMA))
            else:
                changed_rows = new_rows + changed_rows
            if changed_rows:
                table = pa.Table.from_pylist(changed_rows, schema=_EXPERT_SCHEMA)
                table = table.rename_columns([f"c_{n}" for n in table.column_names])
                sets = ", ".join(f"e.{name} = c_{name}" for name, _, _ in _EXPERT_COLUMNS if name != "id")
                self._engine.load(f"LOAD FROM $rows MERGE (e:Expert {{id: c_id}}) SET {sets}", table)
            relink = [r for r in changed_rows if r["id"] in stored]
            if relink:
                self._engine.execute(
                    "UNWIND $ids AS i MATCH (e:Expert {id: i})-[r:BASED_ON|TAGGED|CREATED_BY]->() DELETE r",
                    {"ids": [r["id"] for r in relink]},
                )
            self._link(new_rows + [r for r in changed_rows if r["id"] in stored])
        return UpsertResult(
            created=len(created),
            updated=len(updated),
            unchanged=unchanged,
            created_ids=tuple(created),
            updated_ids=tuple(updated),
        )

    def _link(self, rows: Sequence[dict[str, Any]]) -> None:
        """Create the BASED_ON/TAGGED/CREATED_BY links (and their target nodes) of freshly written rows."""
        pairs: dict[str, list[tuple[str, str]]] = {rel: [] for rel, _ in _LINKS}
        for row in rows:
            if row["base_family"]:
                pairs["BASED_ON"].append((row["id"], row["base_family"]))
            for tag in dict.fromkeys(t.strip() for t in row["tags"] or []):
                if tag:
                    pairs["TAGGED"].append((row["id"], tag))
            if row["creator"]:
                pairs["CREATED_BY"].append((row["id"], row["creator"]))
        for rel, target in _LINKS:
            if not pairs[rel]:
                continue
            names = sorted({name for _, name in pairs[rel]})
            self._engine.load(
                f"LOAD FROM $rows MERGE (n:{target} {{name: c_name}})", pa.table({"c_name": pa.array(names)})
            )
            src, dst = zip(*pairs[rel], strict=True)
            table = pa.table({"from": pa.array(src, pa.string()), "to": pa.array(dst, pa.string())})
            self._write_rels(rel, table, ("Expert", "id"), (target, "name"))

    def get_expert(self, expert_id: str) -> Expert:
        experts = self._read_experts("MATCH (e:Expert {id: $id})", {"id": expert_id})
        if not experts:
            raise NotFoundError(f"unknown expert {expert_id!r}")
        return experts[0]

    def find_experts(self, filters: ExpertFilter | None = None, limit: int = 1000) -> list[Expert]:
        f = filters or ExpertFilter()
        clauses: list[str] = []
        params: dict[str, Any] = {"limit": max(0, int(limit))}
        group = _kind_group(f.kind)
        if group is not None:
            clauses.append("e.label = $label")
            params["label"] = group
        for name in ("base_family", "source", "creator"):
            value = getattr(f, name)
            if value is not None:
                clauses.append(f"e.{name} = ${name}")
                params[name] = value
        if f.tag is not None:
            clauses.append("list_contains(e.tags, $tag)")
            params["tag"] = f.tag
        if f.uncalibrated_for is not None:
            clauses.append(
                "(e.calibrated_at IS NULL OR e.ref_set_version IS NULL OR e.ref_set_version <> $rsv)"
            )
            params["rsv"] = f.uncalibrated_for
        if f.name_contains is not None:
            clauses.append("lower(e.name) CONTAINS lower($name_q)")
            params["name_q"] = f.name_contains
        where = ("WHERE " + " AND ".join(clauses)) if clauses else ""
        table = self._engine.arrow(
            f"MATCH (e:Expert) {where} RETURN {_EXPERT_READ}, e.embedding AS embedding ORDER BY e.id LIMIT $limit",
            params,
        )
        return [_expert_from_row(row) for row in table.to_pylist()]

    def delete_expert(self, expert_id: str) -> None:
        self._require("Expert", [expert_id], "expert")
        with self._write():
            self._engine.execute("MATCH (e:Expert {id: $id}) DETACH DELETE e", {"id": expert_id})

    # reference prompts and capabilities ---------------------------------------------------------
    def upsert_ref_prompts(self, prompts: Sequence[RefPrompt]) -> int:
        batch = {p.id: p for p in prompts}
        if not batch:
            return 0
        dims = []
        for p in batch.values():
            if p.embedding:
                dims.append(
                    (
                        f"reference prompt {p.id!r}",
                        check_vector(f"reference prompt {p.id!r}", p.embedding).size,
                    )
                )
        self._claim_dim(dims)
        table = pa.table(
            {
                "c_id": pa.array(list(batch), pa.string()),
                "c_category": pa.array([p.category for p in batch.values()], pa.string()),
                "c_text": pa.array([p.text for p in batch.values()], pa.string()),
                "c_set_version": pa.array([p.set_version for p in batch.values()], pa.string()),
                "c_source": pa.array([p.source for p in batch.values()], pa.string()),
                "c_embedding": pa.array(
                    [
                        list(np.asarray(p.embedding, np.float32)) if p.embedding else None
                        for p in batch.values()
                    ],
                    pa.list_(pa.float32()),
                ),
            }
        )
        with self._write():
            self._engine.load(
                "LOAD FROM $rows MERGE (p:RefPrompt {id: c_id}) SET p.category = c_category, p.text = c_text, "
                "p.set_version = c_set_version, p.source = c_source, p.embedding = c_embedding",
                table,
            )
        return len(batch)

    def list_ref_prompts(self, set_version: str | None = None) -> list[RefPrompt]:
        where = "WHERE p.set_version = $v" if set_version is not None else ""
        table = self._engine.arrow(
            f"MATCH (p:RefPrompt) {where} RETURN p.id AS id, p.category AS category, p.text AS text, "
            "p.set_version AS set_version, p.source AS source, p.embedding AS embedding ORDER BY p.id",
            {"v": set_version} if set_version is not None else {},
        )
        out = []
        for row in table.to_pylist():
            emb = row.pop("embedding")
            out.append(
                RefPrompt.model_validate(
                    {
                        **{k: v or "" for k, v in row.items()},
                        "embedding": [float(x) for x in emb] if emb else None,
                    }
                )
            )
        return out

    def write_capabilities(self, capabilities: Sequence[Capability]) -> int:
        """Replace the CAPABILITY edge of each (expert, prompt) pair; all-or-nothing on unknown ids."""
        batch = unique_capabilities(capabilities)
        if not batch:
            return 0
        expert_ids = sorted({e for e, _ in batch})
        prompt_ids = sorted({p for _, p in batch})
        self._require("Expert", expert_ids, "expert")
        self._require("RefPrompt", prompt_ids, "reference prompt")
        caps = list(batch.values())
        table = pa.Table.from_pydict(
            {
                "from": [c.expert_id for c in caps],
                "to": [c.prompt_id for c in caps],
                "score": [c.score for c in caps],
                "metrics": [json.dumps(c.metrics, sort_keys=True) for c in caps],
                "n_images": [c.n_images for c in caps],
                "calibrated_at": [_iso(c.calibrated_at) for c in caps],
                "ref_set_version": [c.ref_set_version for c in caps],
            },
            schema=_CAPABILITY_SCHEMA,
        )
        with self._write():
            existing = self._by_id(
                "(a:Expert {id: $id})-[c:CAPABILITY]->(b:RefPrompt)",
                "a.id, b.id",
                expert_ids,
            )
            stale: dict[str, list[str]] = {}
            for a, b in existing:
                if (a, b) in batch:
                    stale.setdefault(a, []).append(b)
            if 0 < len(stale) <= _PER_ID_MAX:  # per expert: the plan walks that expert's own edges only
                for expert_id, pids in stale.items():
                    self._engine.execute(
                        "MATCH (a:Expert {id: $id})-[c:CAPABILITY]->(b:RefPrompt) "
                        "WHERE list_contains($pids, b.id) DELETE c",
                        {"id": expert_id, "pids": pids},
                    )
            elif stale:
                self._engine.load(
                    "LOAD FROM $rows MATCH (a:Expert {id: c_expert})-[c:CAPABILITY]->(b:RefPrompt) "
                    "WHERE list_contains(c_prompts, b.id) DELETE c",
                    pa.table(
                        {
                            "c_expert": pa.array(list(stale), pa.string()),
                            "c_prompts": pa.array(list(stale.values()), pa.list_(pa.string())),
                        }
                    ),
                )
            self._write_rels("CAPABILITY", table, ("Expert", "id"), ("RefPrompt", "id"))
        return len(caps)

    def get_capabilities(
        self, expert_id: str | None = None, prompt_id: str | None = None
    ) -> list[Capability]:
        params: dict[str, Any] = {}
        expert_pattern, prompt_pattern = "(a:Expert)", "(b:RefPrompt)"
        if expert_id is not None:  # property patterns use the primary-key index
            expert_pattern = "(a:Expert {id: $eid})"
            params["eid"] = expert_id
        if prompt_id is not None:
            prompt_pattern = "(b:RefPrompt {id: $pid})"
            params["pid"] = prompt_id
        table = self._engine.arrow(
            f"MATCH {expert_pattern}-[c:CAPABILITY]->{prompt_pattern} RETURN a.id AS expert_id, "
            "b.id AS prompt_id, c.score AS score, c.metrics AS metrics, c.n_images AS n_images, "
            "c.calibrated_at AS calibrated_at, c.ref_set_version AS ref_set_version ORDER BY a.id, b.id",
            params,
        )
        return [
            Capability(
                expert_id=r["expert_id"],
                prompt_id=r["prompt_id"],
                score=round(float(r["score"]), SCORE_DECIMALS),
                metrics=json.loads(r["metrics"] or "{}"),
                n_images=r["n_images"] or 0,
                calibrated_at=_parse_dt(r["calibrated_at"]) or utcnow(),
                ref_set_version=r["ref_set_version"] or "",
            )
            for r in table.to_pylist()
        ]

    def mark_calibrated(
        self, expert_id: str, ref_set_version: str, scorer_version: str, calibrated_at: datetime
    ) -> None:
        self._require("Expert", [expert_id], "expert")
        with self._write():
            self._engine.execute(
                "MATCH (e:Expert {id: $id}) SET e.calibrated_at = $at, e.ref_set_version = $rsv, "
                "e.scorer_version = $sv",
                {"id": expert_id, "at": _iso(calibrated_at), "rsv": ref_set_version, "sv": scorer_version},
            )

    # similarity and retrieval --------------------------------------------------------------------
    def link_similar(self, k: int = 5) -> int:
        """Recompute SIMILAR_TO from scratch: each expert to its ``k`` nearest experts of the same family."""
        table = self._engine.arrow(
            "MATCH (e:Expert) WHERE e.embedding IS NOT NULL RETURN e.id AS id, e.base_family AS family, "
            "e.embedding AS embedding ORDER BY e.id"
        )
        dim = self._embedding_dim() or DEFAULT_DIM
        ids = np.asarray(table.column("id").to_pylist(), dtype=object)
        families = np.asarray(table.column("family").to_pylist(), dtype=object)
        matrix = _normalise(_embedding_matrix(table.column("embedding"), dim))
        src: list[str] = []
        dst: list[str] = []
        scores: list[float] = []
        for family in sorted(set(families.tolist())):
            rows = np.nonzero(families == family)[0]
            sub = matrix[rows]
            kk = min(k, len(rows) - 1)
            if kk <= 0:
                continue
            for start in range(0, len(rows), 1024):  # blocks bound the memory of the score matrix
                block = sub[start : start + 1024] @ sub.T
                local = np.arange(block.shape[0])
                block[local, start + local] = -np.inf  # not similar to itself
                block = np.round(block, 6)
                part = np.argpartition(-block, kk - 1, axis=1)[:, :kk]
                vals = np.take_along_axis(block, part, axis=1)
                order = np.lexsort((part, -vals), axis=-1)  # best first, ties by id (rows are id-sorted)
                part = np.take_along_axis(part, order, axis=1)
                vals = np.take_along_axis(vals, order, axis=1)
                src.extend(np.repeat(ids[rows[start : start + block.shape[0]]], kk).tolist())
                dst.extend(ids[rows[part.ravel()]].tolist())
                scores.extend(vals.ravel().tolist())
        edges = pa.table(
            {
                "from": pa.array(src, pa.string()),
                "to": pa.array(dst, pa.string()),
                "score": pa.array(scores, pa.float32()),
            }
        )
        with self._write():
            self._engine.execute("MATCH (:Expert)-[s:SIMILAR_TO]->(:Expert) DELETE s")
            self._write_rels("SIMILAR_TO", edges, ("Expert", "id"), ("Expert", "id"))
        return edges.num_rows

    def _data_version(self) -> str:
        rows = self._engine.execute("MATCH (m:Meta {key: 'data_version'}) RETURN m.value")
        return rows[0][0] if rows else ""

    @contextmanager
    def _write(self) -> Iterator[None]:
        """A write transaction that also renews the ``data_version`` token (invalidates cached banks)."""
        with self._engine.transaction():
            yield
            self._engine.execute(
                "MERGE (m:Meta {key: 'data_version'}) SET m.value = $v", {"v": uuid.uuid4().hex}
            )

    def _bank(self) -> _Bank:
        version = self._data_version()
        bank = _BANKS.get(self.path)
        if bank is not None and bank.version == version:
            return bank
        table = self._engine.arrow(
            "MATCH (e:Expert) WHERE e.embedding IS NOT NULL RETURN e.id AS id, e.embedding AS embedding, "
            "e.label AS label, e.base_family AS family, e.nsfw AS nsfw, e.allow_commercial_use AS commercial, "
            "e.allow_derivatives AS derivatives, e.kind AS kind, e.name AS name, e.popularity AS popularity"
        )
        dim = self._embedding_dim() or DEFAULT_DIM
        ids = np.asarray(table.column("id").to_pylist(), dtype=object)
        order = np.argsort(ids, kind="stable")

        def column(name: str, fill: Any) -> np.ndarray:
            return np.asarray(table.column(name).fill_null(fill).to_pylist(), dtype=object)[order]

        matrix = _embedding_matrix(table.column("embedding"), dim)
        bank = _Bank(
            version=version,
            ids=ids[order],
            matrix=matrix[order],
            inv_norms=1.0 / np.maximum(np.linalg.norm(matrix[order], axis=1), 1e-12),
            labels=column("label", ""),
            families=column("family", ""),
            nsfw=column("nsfw", False).astype(bool),
            commercial=np.asarray([commercial_use_ok(v) for v in column("commercial", "")], dtype=bool),
            derivatives=column("derivatives", True).astype(bool),
            nodes={
                i: self._expert_node({"id": i, "kind": k, "name": n, "base_family": f, "popularity": p})
                for i, k, n, f, p in zip(
                    ids[order],
                    column("kind", "lora"),
                    column("name", ""),
                    column("family", ""),
                    column("popularity", 0.0),
                    strict=True,
                )
            },
        )
        _remember(_BANKS, self.path, bank)
        return bank

    def _prompt_bank(self) -> _PromptBank:
        version = self._data_version()
        bank = _PROMPT_BANKS.get(self.path)
        if bank is not None and bank.version == version:
            return bank
        table = self._engine.arrow(
            "MATCH (p:RefPrompt) RETURN p.id AS id, p.category AS category, p.text AS text, "
            "p.embedding AS embedding ORDER BY id"
        )
        dim = self._embedding_dim() or DEFAULT_DIM
        ids = table.column("id").to_pylist()
        meta = table.select(["category", "text"]).to_pylist()
        bank = _PromptBank(
            version=version,
            ids=ids,
            matrix=_embedding_matrix(table.column("embedding"), dim),
            rows=dict(zip(ids, meta, strict=True)),
        )
        _remember(_PROMPT_BANKS, self.path, bank)
        return bank

    def candidates(
        self,
        embedding: Sequence[float] | np.ndarray,
        kind: ExpertKind | str | None = None,
        base_family: str | None = None,
        k: int = 20,
        filters: CandidateFilter | None = None,
    ) -> list[Candidate]:
        """Top-``k`` experts by cosine similarity, best first, ties broken by id."""
        query = check_vector("query", embedding)
        f = filters or CandidateFilter()
        bank = self._bank()
        rows, matrix = bank.slice(_kind_group(kind), base_family or None)
        if len(rows) == 0 or k <= 0:
            return []
        if query.size != matrix.shape[1]:
            raise GraphError(
                f"query embedding has {query.size} dimensions, the graph stores {matrix.shape[1]}"
            )
        scores = matrix @ (query / max(float(np.linalg.norm(query)), 1e-12))
        mask = np.ones(len(rows), dtype=bool)
        if not f.allow_nsfw:
            mask &= ~bank.nsfw[rows]
        if f.require_commercial_use:
            mask &= bank.commercial[rows]
        if f.require_derivatives:
            mask &= bank.derivatives[rows]
        if f.exclude_ids:
            mask &= ~np.isin(bank.ids[rows], list(f.exclude_ids))
        scores = np.where(mask, scores, -np.inf)
        best = _top_k(scores, k)
        chosen = [str(bank.ids[rows[i]]) for i in best]
        experts = self._experts_by_id(chosen, bank)
        return [
            Candidate(experts[i], float(scores[j])) for i, j in zip(chosen, best, strict=True) if i in experts
        ]

    def search_corpus(self) -> SearchCorpus:
        """Every expert with the indexes retrieval ranks on, cached until the next write (``graphdb.search``)."""
        return cached_corpus(
            f"embedded:{self.path}", self._data_version(), lambda: self.find_experts(limit=ALL_EXPERTS)
        )

    # activation ----------------------------------------------------------------------------------
    def activate_subgraph(
        self, expert_ids: Sequence[str], prompt_embedding: Sequence[float] | np.ndarray | None = None
    ) -> Subgraph:
        """Selected experts + their CAPABILITY edges and reference prompts + SIMILAR_TO neighbours."""
        ids = list(dict.fromkeys(expert_ids))
        dim = self._embedding_dim() or DEFAULT_DIM
        # node fields and embeddings come from the cached bank (one bulk read per data version); only
        # experts without an embedding (absent from the bank) are looked up
        bank = self._bank()
        prompt_bank = self._prompt_bank()
        selected = self._node_rows(ids, bank)
        missing = [i for i in ids if i not in selected]
        if missing:
            raise NotFoundError(
                f"unknown expert{'s' if len(missing) > 1 else ''}: {', '.join(map(repr, missing))}"
            )
        # edges first, ids only: returning node properties from a pattern scans the whole node table
        similar = [
            *self._by_id("(a:Expert {id: $id})-[s:SIMILAR_TO]->(b:Expert)", "a.id, b.id, s.score", ids),
            *self._by_id("(b:Expert)-[s:SIMILAR_TO]->(a:Expert {id: $id})", "b.id, a.id, s.score", ids),
        ]
        caps = sorted(
            self._by_id(
                "(a:Expert {id: $id})-[c:CAPABILITY]->(p:RefPrompt)", "a.id, p.id, c.score, c.metrics", ids
            )
        )
        neighbours = sorted({x for edge in similar for x in edge[:2]} - set(ids))
        prompt_ids = sorted({c[1] for c in caps})
        nodes: list[SubgraphNode] = []
        expert_ids: list[str] = []
        for rows, wanted in ((selected, ids), (self._node_rows(neighbours, bank), neighbours)):
            for expert_id in wanted:
                if expert_id in rows:
                    nodes.append(rows[expert_id])
                    expert_ids.append(expert_id)
        positions = bank.rows_of(expert_ids)
        expert_matrix = np.zeros((len(expert_ids), dim), dtype=np.float32)
        if bank.matrix.shape[1] == dim and len(expert_ids):
            found_rows = positions >= 0
            expert_matrix[found_rows] = bank.matrix[positions[found_rows]]  # as stored, like prompts
        position = prompt_bank.position
        prompt_rows = [position[p] for p in prompt_ids]
        for p in prompt_ids:
            meta = prompt_bank.rows[p]
            nodes.append(
                SubgraphNode(p, "refprompt", text=meta["text"] or "", category=meta["category"] or "")
            )
        blocks = [expert_matrix, prompt_bank.matrix[np.asarray(prompt_rows, dtype=np.int64)]]
        edges: dict[tuple[str, str, str], SubgraphEdge] = {}
        for src, dst, score in similar:
            edges[(src, dst, "SIMILAR_TO")] = SubgraphEdge(
                src, dst, "SIMILAR_TO", round(float(score), SCORE_DECIMALS)
            )
        for src, dst, score, metrics in caps:
            edges[(src, dst, "CAPABILITY")] = SubgraphEdge(
                src, dst, "CAPABILITY", round(float(score), SCORE_DECIMALS), json.loads(metrics or "{}")
            )
        embeddings = np.vstack(blocks)
        sub = Subgraph(nodes=nodes, edges=list(edges.values()), embeddings=embeddings)
        if prompt_embedding is not None:
            query = check_vector("prompt", prompt_embedding)
            if query.size != dim:
                raise GraphError(f"prompt embedding has {query.size} dimensions, the graph stores {dim}")
            sub = sub.with_prompt("", query)
        return sub

    def _node_rows(self, ids: Sequence[str], bank: _Bank) -> dict[str, SubgraphNode]:
        """Activation nodes of experts by id: from the bank, else from the expert's JSON record."""
        nodes = {i: bank.nodes[i] for i in ids if i in bank.nodes}
        rest = [i for i in ids if i not in nodes]
        for expert_id, record in self._by_id("(e:Expert {id: $id})", "e.id, e.record", rest):
            nodes[expert_id] = self._expert_node(json.loads(record))
        return nodes

    @staticmethod
    def _expert_node(record: dict[str, Any]) -> SubgraphNode:
        kind = ExpertKind(record["kind"])
        return SubgraphNode(
            record["id"],
            "checkpoint" if kind is ExpertKind.checkpoint else "lora",
            text=record.get("name") or "",
            family=record.get("base_family") or "",
            popularity=float(record.get("popularity") or 0.0),
        )

    # generations and stats -----------------------------------------------------------------------
    def record_generation(
        self,
        generation_id: str,
        prompt: str,
        used: Sequence[tuple[str, float]],
        created_at: datetime | None = None,
    ) -> None:
        """Create or replace the :Generation node ``generation_id`` and its USED edges (idempotent)."""
        if not generation_id:
            raise GraphError("a generation needs an id")
        coefficients = {}
        for expert_id, coefficient in used:
            if not math.isfinite(float(coefficient)):
                raise GraphError(f"generation {generation_id!r}: non-finite coefficient for {expert_id!r}")
            coefficients[expert_id] = float(coefficient)
        self._require("Expert", coefficients, "expert")
        table = pa.table(
            {
                "from": pa.array([generation_id] * len(coefficients), pa.string()),
                "to": pa.array(list(coefficients), pa.string()),
                "coefficient": pa.array(list(coefficients.values()), pa.float64()),
            }
        )
        with self._write():
            self._engine.execute(
                "MERGE (g:Generation {id: $id}) ON CREATE SET g.created_at = $at SET g.prompt = $prompt",
                {"id": generation_id, "prompt": prompt[:20_000], "at": _iso(created_at or utcnow())},
            )
            if created_at is not None:
                self._engine.execute(
                    "MATCH (g:Generation {id: $id}) SET g.created_at = $at",
                    {"id": generation_id, "at": _iso(created_at)},
                )
            self._engine.execute(
                "MATCH (g:Generation {id: $id})-[u:USED]->() DELETE u", {"id": generation_id}
            )
            self._write_rels("USED", table, ("Generation", "id"), ("Expert", "id"))

    def stats(self) -> GraphStats:
        nodes = {}
        for label in ("Expert", "BaseModel", "Tag", "Creator", "RefPrompt", "Generation"):
            nodes[label] = int(self._engine.execute(f"MATCH (n:{label}) RETURN count(n)")[0][0])
        by_label = dict(self._engine.execute("MATCH (e:Expert) RETURN e.label, count(e)"))
        nodes["Checkpoint"] = int(by_label.get("Checkpoint", 0))
        nodes["LoRA"] = int(by_label.get("LoRA", 0))
        ordered = {
            label: nodes[label]
            for label in (
                "Expert",
                "Checkpoint",
                "LoRA",
                "BaseModel",
                "Tag",
                "Creator",
                "RefPrompt",
                "Generation",
            )
        }
        rels = {
            rel: int(self._engine.execute(f"MATCH ()-[r:{rel}]->() RETURN count(r)")[0][0])
            for rel in REL_TYPES
        }
        return GraphStats(nodes=ordered, relationships=rels)
