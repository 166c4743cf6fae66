"""``EmbeddedGraphStore``: the ``GraphStore`` contract on an embedded, file-backed LadybugDB database.

Every statement comes from ``graphdb.embedded.queries`` and every backend-independent decision from
``graphdb.rules``; this module reads and writes rows and keeps the in-memory retrieval banks.

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

import json
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
from graphdb import rules
from graphdb.embedded import queries as q
from graphdb.embedded.engine import Engine
from graphdb.search import ALL_EXPERTS, SearchCorpus, cached_corpus
from graphdb.store import (
    NODE_LABELS,
    REL_TYPES,
    Candidate,
    CandidateFilter,
    ExpertFilter,
    GraphStats,
    UpsertResult,
)
from graphdb.subgraph import Subgraph, SubgraphNode

DEFAULT_DIM = 384
SCORE_DECIMALS = rules.SCORE_DECIMALS  # CAPABILITY/SIMILAR_TO scores are 32-bit floats (COPY is 2.5x faster)
_DATE_FIELDS = ("created_at", "updated_at", "calibrated_at")


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


def _expert_row(expert: Expert) -> dict[str, Any]:
    """One Expert table row: every field as its own column (readable, filterable) plus the JSON record."""
    row = expert.model_dump(mode="python", exclude={"files", "embedding", "kind", *_DATE_FIELDS})
    record = rules.record_json(expert)
    row.update(
        label=expert.label,
        kind=expert.kind.value,
        files=json.dumps([f.model_dump(mode="json") for f in expert.files]),
        embedding=list(np.asarray(expert.embedding, dtype=np.float32)) if expert.embedding else None,
        record=record,
        record_hash=rules.record_hash(expert, record),
        **{name: _iso(getattr(expert, name)) for name in _DATE_FIELDS},
    )
    return row


def _expert_from_row(row: dict[str, Any], embedding: list[float] | None = None) -> Expert:
    """Rebuild an Expert from ``q.EXPERT_READ`` columns (+ ``embedding`` column or the given vector)."""
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
        for statement in q.SCHEMA_DDL:
            self._engine.execute(statement)

    def close(self) -> None:
        self._engine.close()

    def __enter__(self) -> EmbeddedGraphStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # helpers -----------------------------------------------------------------------------------
    def _embedding_dim(self) -> int | None:
        rows = self._engine.execute(q.EMBEDDING_DIM_QUERY)
        return int(rows[0][0]) if rows else None

    def _claim_dim(self, dims: Iterable[tuple[str, int]]) -> None:
        """Check a write's embeddings against the graph's one dimension; the first write records it."""
        stored = self._embedding_dim()
        expected = rules.check_dimensions(stored, dims)
        if stored is None and expected is not None:
            self._engine.execute(q.SET_EMBEDDING_DIM_QUERY, {"v": str(expected)})

    def _by_id(self, query: q.ByIdQuery, ids: Sequence[str]) -> list[list[Any]]:
        """Rows of a lookup for each id: few ids, one cached primary-key lookup each (~0.1 ms); many ids,
        one ``UNWIND`` query, which the engine runs as a hash join over a scan of the whole table."""
        ids = list(ids)
        if len(ids) > _PER_ID_MAX:
            return self._engine.execute(query.many, {"ids": ids})
        rows: list[list[Any]] = []
        for one in ids:
            rows.extend(self._engine.execute(query.one, {"id": one}))
        return rows

    def _require(self, table: str, ids: Iterable[str], what: str) -> None:
        wanted = sorted(set(ids))
        rules.require_known(what, wanted, (r[0] for r in self._by_id(q.EXISTING_IDS[table], wanted)))

    def _experts_by_id(self, ids: Sequence[str], bank: _Bank) -> dict[str, Expert]:
        """Experts by id: fields by primary-key lookup, embeddings from the (fresh) bank."""
        rows = [
            dict(zip(q.EXPERT_RECORD_ROW_COLUMNS, r, strict=True))
            for r in self._by_id(q.EXPERT_RECORD_ROW, ids)
        ]
        positions = bank.rows_of([r["id"] for r in rows])
        return {
            row["id"]: _expert_from_row(row, bank.matrix[pos].tolist() if pos >= 0 else None)
            for row, pos in zip(rows, positions, strict=True)
        }

    def _write_rels(self, rel: str, table: pa.Table) -> None:
        """Append relationships (columns ``from``, ``to``, then the properties in ``q.RELATIONSHIPS`` order):
        ``COPY`` for big batches, per-row endpoint match for small ones."""
        if table.num_rows == 0:
            return
        if table.num_rows >= self.bulk_threshold:
            self._engine.load(q.COPY_QUERIES[rel], table)
            return
        self._engine.load(
            q.LOAD_RELS_QUERIES[rel], table.rename_columns([f"c_{n}" for n in table.column_names])
        )

    # experts -----------------------------------------------------------------------------------
    def upsert_experts(self, experts: Sequence[Expert]) -> UpsertResult:
        """Create or update experts and replace their BASED_ON/TAGGED/CREATED_BY links.

        Counts by ``content_hash``; a changed hash clears stored calibration fields (the expert needs
        recalibration) unless the incoming record sets them.
        """
        batch = rules.unique_experts(experts)
        if not batch:
            return UpsertResult()
        stored = {
            r[0]: dict(zip(q.EXPERT_STATE_COLUMNS, r, strict=True))
            for r in self._by_id(q.EXPERT_STATE, list(batch))
        }
        new_rows: list[dict[str, Any]] = []
        changed_rows: list[dict[str, Any]] = []
        outcome: dict[str, list[str]] = {"created": [], "updated": [], "unchanged": []}
        for expert_id, expert in batch.items():
            old = stored.get(expert_id)
            native = None if old is None else {**old, "calibrated_at": _parse_dt(old["calibrated_at"])}
            expert = rules.with_stored_calibration(expert, native)
            row = _expert_row(expert)
            kind = rules.classify(expert, native, row["record_hash"])
            outcome[kind].append(expert_id)
            if old is None:
                new_rows.append(row)
                continue
            # rewrite only what differs from the stored row (the record or the calibration fields)
            same_calibration = all(
                row[k] == (old[k] or ("" if k != "calibrated_at" else None)) for k in rules.CALIBRATION_FIELDS
            )
            if not (old["record_hash"] == row["record_hash"] and same_calibration):
                changed_rows.append(row)
        self._claim_dim(
            (f"expert {r['id']!r}", len(r["embedding"])) for r in [*new_rows, *changed_rows] if r["embedding"]
        )
        with self._write():
            if len(new_rows) >= self.bulk_threshold:
                self._engine.load(
                    q.COPY_QUERIES["Expert"], pa.Table.from_pylist(new_rows, schema=q.EXPERT_SCHEMA)
                )
            else:
                changed_rows = new_rows + changed_rows
            if changed_rows:
                table = pa.Table.from_pylist(changed_rows, schema=q.EXPERT_SCHEMA)
                self._engine.load(
                    q.UPSERT_EXPERTS_QUERY, table.rename_columns([f"c_{n}" for n in table.column_names])
                )
            relink = [r["id"] for r in changed_rows if r["id"] in stored]
            if relink:
                self._engine.execute(q.DELETE_EXPERT_LINKS_QUERY, {"ids": relink})
            self._link([batch[i] for i in [*(r["id"] for r in new_rows), *relink]])
        return UpsertResult(
            created=len(outcome["created"]),
            updated=len(outcome["updated"]),
            unchanged=len(outcome["unchanged"]),
            created_ids=tuple(outcome["created"]),
            updated_ids=tuple(outcome["updated"]),
        )

    def _link(self, experts: Sequence[Expert]) -> None:
        """Create the BASED_ON/TAGGED/CREATED_BY links (and their target nodes) of freshly written experts."""
        pairs: dict[str, list[tuple[str, str]]] = {rel: [] for rel, _ in q.LINKS}
        for expert in experts:
            for rel, targets in rules.link_targets(expert).items():
                pairs[rel].extend((expert.id, name) for name in targets)
        for rel, target in q.LINKS:
            if not pairs[rel]:
                continue
            names = sorted({name for _, name in pairs[rel]})
            self._engine.load(
                q.MERGE_NAMED_QUERIES[target], pa.table({"c_name": pa.array(names, pa.string())})
            )
            src, dst = zip(*pairs[rel], strict=True)
            self._write_rels(
                rel, pa.table({"from": pa.array(src, pa.string()), "to": pa.array(dst, pa.string())})
            )

    def get_expert(self, expert_id: str) -> Expert:
        rows = self._engine.arrow(q.GET_EXPERT_QUERY, {"id": expert_id}).to_pylist()
        if not rows:
            raise NotFoundError(f"unknown expert {expert_id!r}")
        return _expert_from_row(rows[0])

    def find_experts(self, filters: ExpertFilter | None = None, limit: int = 1000) -> list[Expert]:
        f = filters or ExpertFilter()
        query, params = q.find_experts_query(
            {
                "kind": rules.kind_label(f.kind),
                "base_family": f.base_family,
                "source": f.source,
                "tag": f.tag,
                "creator": f.creator,
                "uncalibrated_for": f.uncalibrated_for,
                "name_contains": f.name_contains,
            },
            max(0, int(limit)),
        )
        return [_expert_from_row(row) for row in self._engine.arrow(query, params).to_pylist()]

    def delete_expert(self, expert_id: str) -> None:
        self._require("Expert", [expert_id], "expert")
        with self._write():
            self._engine.execute(q.DELETE_EXPERT_QUERY, {"id": expert_id})

    # reference prompts and capabilities ---------------------------------------------------------
    def upsert_ref_prompts(self, prompts: Sequence[RefPrompt]) -> int:
        batch = rules.unique_ref_prompts(prompts)
        if not batch:
            return 0
        self._claim_dim(rules.embedding_dims(batch.values(), "reference prompt"))
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
            self._engine.load(q.UPSERT_REF_PROMPTS_QUERY, table)
        return len(batch)

    def list_ref_prompts(self, set_version: str | None = None) -> list[RefPrompt]:
        if set_version is None:
            table = self._engine.arrow(q.LIST_REF_PROMPTS_QUERY)
        else:
            table = self._engine.arrow(q.LIST_REF_PROMPTS_BY_VERSION_QUERY, {"v": set_version})
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
        batch = rules.unique_capabilities(capabilities)
        if not batch:
            return 0
        expert_ids = sorted({e for e, _ in batch})
        self._require("Expert", expert_ids, "expert")
        self._require("RefPrompt", (p for _, p in batch), "reference prompt")
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
            schema=q.CAPABILITY_SCHEMA,
        )
        with self._write():
            stale: dict[str, list[str]] = {}
            for a, b in self._by_id(q.CAPABILITY_PAIRS, expert_ids):
                if (a, b) in batch:
                    stale.setdefault(a, []).append(b)
            if 0 < len(stale) <= _PER_ID_MAX:
                for expert_id, pids in stale.items():
                    self._engine.execute(q.DELETE_EXPERT_CAPABILITIES_QUERY, {"id": expert_id, "pids": pids})
            elif stale:
                self._engine.load(
                    q.DELETE_CAPABILITIES_BULK_QUERY,
                    pa.table(
                        {
                            "c_expert": pa.array(list(stale), pa.string()),
                            "c_prompts": pa.array(list(stale.values()), pa.list_(pa.string())),
                        }
                    ),
                )
            self._write_rels("CAPABILITY", table)
        return len(caps)

    def get_capabilities(
        self, expert_id: str | None = None, prompt_id: str | None = None
    ) -> list[Capability]:
        query, params = q.get_capabilities_query(expert_id, prompt_id)
        return [
            Capability(
                expert_id=r["expert_id"],
                prompt_id=r["prompt_id"],
                score=rules.rounded_score(r["score"]),
                metrics=json.loads(r["metrics"] or "{}"),
                n_images=r["n_images"] or 0,
                calibrated_at=_parse_dt(r["calibrated_at"]) or utcnow(),
                ref_set_version=r["ref_set_version"] or "",
            )
            for r in self._engine.arrow(query, params).to_pylist()
        ]

    def mark_calibrated(
        self, expert_id: str, ref_set_version: str, scorer_version: str, calibrated_at: datetime
    ) -> None:
        self._require("Expert", [expert_id], "expert")
        with self._write():
            self._engine.execute(
                q.MARK_CALIBRATED_QUERY,
                {"id": expert_id, "at": _iso(calibrated_at), "rsv": ref_set_version, "sv": scorer_version},
            )

    # similarity and retrieval --------------------------------------------------------------------
    def link_similar(self, k: int = 5) -> int:
        """Recompute SIMILAR_TO from scratch: each expert to its ``k`` nearest experts of the same family."""
        table = self._engine.arrow(q.EXPERT_EMBEDDINGS_QUERY)
        matrix = _embedding_matrix(table.column("embedding"), self._embedding_dim() or DEFAULT_DIM)
        similar = rules.top_k_similar(
            table.column("id").to_pylist(), table.column("family").to_pylist(), matrix, k
        )
        src, dst, scores = zip(*similar, strict=True) if similar else ((), (), ())
        edges = pa.table(
            {
                "from": pa.array(src, pa.string()),
                "to": pa.array(dst, pa.string()),
                "score": pa.array(scores, pa.float32()),
            }
        )
        with self._write():
            self._engine.execute(q.DELETE_SIMILAR_QUERY)
            self._write_rels("SIMILAR_TO", edges)
        return edges.num_rows

    def _data_version(self) -> str:
        rows = self._engine.execute(q.DATA_VERSION_QUERY)
        return rows[0][0] if rows else ""

    @contextmanager
    def _write(self) -> Iterator[None]:
        """A write transaction that also renews the ``data_version`` token (invalidates cached banks)."""
        with self._engine.transaction():
            yield
            self._engine.execute(q.RENEW_DATA_VERSION_QUERY, {"v": uuid.uuid4().hex})

    def _bank(self) -> _Bank:
        version = self._data_version()
        bank = _BANKS.get(self.path)
        if bank is not None and bank.version == version:
            return bank
        table = self._engine.arrow(q.BANK_QUERY)
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
            commercial=np.asarray([rules.commercial_use_ok(v) for v in column("commercial", "")], dtype=bool),
            derivatives=column("derivatives", True).astype(bool),
            nodes={
                i: rules.expert_node(i, k, n, f, p)
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
        table = self._engine.arrow(q.PROMPT_BANK_QUERY)
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
        query = rules.check_vector("query", embedding)
        f = filters or CandidateFilter()
        bank = self._bank()
        rows, matrix = bank.slice(rules.kind_label(kind), base_family or None)
        if len(rows) == 0 or k <= 0:
            return []
        rules.check_query_dimension("query", query, matrix.shape[1])
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
        best = rules.top_k(scores, k)  # bank rows are sorted by id: ties go to the smaller id
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
        nodes = self._node_rows(ids, bank)
        rules.require_known("expert", ids, nodes)
        # edges first, ids only: returning node properties from a pattern scans the whole node table
        similar = [
            (a, b, score)
            for a, b, score in [*self._by_id(q.SIMILAR_OUT, ids), *self._by_id(q.SIMILAR_IN, ids)]
        ]
        caps = [
            (a, p, score, json.loads(metrics or "{}"))
            for a, p, score, metrics in self._by_id(q.ACTIVATION_CAPABILITIES, ids)
        ]
        neighbours = rules.neighbour_ids(ids, similar)
        nodes.update(self._node_rows(neighbours, bank))
        order = [i for i in [*ids, *neighbours] if i in nodes]
        stored = bank.matrix.shape[1] == dim
        experts = [
            (nodes[i], bank.matrix[p] if stored and p >= 0 else None)
            for i, p in zip(order, bank.rows_of(order), strict=True)
        ]
        position = prompt_bank.position
        prompts = {}
        for p in {c[1] for c in caps}:
            meta = prompt_bank.rows[p]
            node = SubgraphNode(p, "refprompt", text=meta["text"] or "", category=meta["category"] or "")
            prompts[p] = (node, prompt_bank.matrix[position[p]])
        sub = rules.assemble_subgraph(experts, similar, caps, prompts, dim)
        return rules.attach_prompt(sub, prompt_embedding, dim)

    def _node_rows(self, ids: Sequence[str], bank: _Bank) -> dict[str, SubgraphNode]:
        """Activation nodes of experts by id: from the bank, else from the expert's JSON record."""
        nodes = {i: bank.nodes[i] for i in ids if i in bank.nodes}
        rest = [i for i in ids if i not in nodes]
        for expert_id, record in self._by_id(q.EXPERT_RECORD, rest):
            r = json.loads(record)
            nodes[expert_id] = rules.expert_node(
                expert_id, r["kind"], r.get("name"), r.get("base_family"), r.get("popularity")
            )
        return nodes

    # generations and stats -----------------------------------------------------------------------
    def record_generation(
        self,
        generation_id: str,
        prompt: str,
        used: Sequence[tuple[str, float]],
        created_at: datetime | None = None,
    ) -> None:
        """Create or replace the :Generation node ``generation_id`` and its USED edges (idempotent)."""
        coefficients = rules.generation_coefficients(generation_id, used)
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
                q.MERGE_GENERATION_QUERY,
                {
                    "id": generation_id,
                    "prompt": rules.generation_prompt(prompt),
                    "at": _iso(created_at or utcnow()),
                },
            )
            if created_at is not None:
                self._engine.execute(
                    q.SET_GENERATION_CREATED_QUERY, {"id": generation_id, "at": _iso(created_at)}
                )
            self._engine.execute(q.DELETE_GENERATION_USED_QUERY, {"id": generation_id})
            self._write_rels("USED", table)

    def stats(self) -> GraphStats:
        nodes = {
            label: int(self._engine.execute(query)[0][0]) for label, query in q.NODE_COUNT_QUERIES.items()
        }
        by_label = dict(self._engine.execute(q.EXPERT_LABEL_COUNTS_QUERY))
        nodes["Checkpoint"] = int(by_label.get("Checkpoint", 0))
        nodes["LoRA"] = int(by_label.get("LoRA", 0))
        nodes["Embedding"] = int(by_label.get("Embedding", 0))
        return GraphStats(
            nodes={label: nodes[label] for label in NODE_LABELS},
            relationships={
                rel: int(self._engine.execute(q.REL_COUNT_QUERIES[rel])[0][0]) for rel in REL_TYPES
            },
        )
