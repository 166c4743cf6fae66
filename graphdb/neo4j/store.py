"""``Neo4jGraphStore``: the ``GraphStore`` contract over the official ``neo4j`` driver.

Every statement comes from ``graphdb.neo4j.queries``; this module owns the mapping between domain models
and rows (``expert_row`` / ``expert_from_props`` and friends, pure functions) and the transactions.
Multi-statement writes run as managed transactions (``session.execute_write``), which the driver retries
on transient errors; each transaction function re-reads what it depends on, so a retry is safe.

Semantics match the embedded backend (``graphdb/embedded/store.py``); the contract suite in
``tests/graphdb/test_contract.py`` runs against both when ``NEO4J_URI`` is set.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from datetime import date, datetime
from typing import Any, TypeVar

import numpy as np

from core.types import Capability, Expert, ExpertKind, NotFoundError, RefPrompt, utcnow
from graphdb.neo4j import queries as q
from graphdb.search import ALL_EXPERTS, SearchCorpus, cached_corpus
from graphdb.store import (
    NODE_LABELS,
    REL_TYPES,
    Candidate,
    CandidateFilter,
    ExpertFilter,
    GraphError,
    GraphStats,
    GraphUnavailable,
    UpsertResult,
    check_vector,
    commercial_use_ok,
    unique_capabilities,
    unique_experts,
)
from graphdb.subgraph import Subgraph, SubgraphEdge, SubgraphNode

T = TypeVar("T")

SCHEMES = ("neo4j", "neo4j+s", "neo4j+ssc", "bolt", "bolt+s", "bolt+ssc")
BATCH_ROWS = 1000  # rows per UNWIND statement
MAX_VECTOR_FETCH = 10_000  # largest vector-index pool before candidates() switches to exact search
MAX_PROMPT_CHARS = 20_000
_CALIBRATION_FIELDS = ("calibrated_at", "ref_set_version", "scorer_version")
# CAPABILITY properties that are not metrics (metrics are stored flat beside them, readable in Browser)
_CAPABILITY_FIELDS = ("score", "n_images", "calibrated_at", "ref_set_version")
_INTERNAL_EXPERT_PROPS = ("files_json", "record_hash", "commercial_use_ok")


# ------------------------------------------------------------------------------------ pure row mapping


def record_hash(expert: Expert) -> str:
    """Hash of the whole record except calibration fields (change detection when ``content_hash`` is empty)."""
    payload = expert.model_dump(mode="json", exclude={*_CALIBRATION_FIELDS, "embedding"})
    digest = hashlib.sha256(json.dumps(payload, sort_keys=True).encode())
    if expert.embedding:
        digest.update(np.asarray(expert.embedding, dtype=np.float32).tobytes())
    return digest.hexdigest()


def to_native(value: Any) -> Any:
    """Driver values as plain Python (``neo4j.time`` types to ``datetime``/``date``, lists recursively)."""
    if isinstance(value, list):
        return [to_native(v) for v in value]
    to_native_method = getattr(value, "to_native", None)
    if callable(to_native_method) and not isinstance(value, (datetime, date)):
        return to_native_method()
    return value


def with_stored_calibration(expert: Expert, stored: dict[str, Any] | None) -> Expert:
    """Apply the calibration rule: an unchanged ``content_hash`` keeps each stored calibration field the
    new record leaves empty; a changed hash keeps nothing (the expert needs recalibration)."""
    if stored is None or (stored.get("content_hash") or "") != expert.content_hash:
        return expert
    update = {
        name: to_native(stored.get(name)) or (None if name == "calibrated_at" else "")
        for name in _CALIBRATION_FIELDS
        if not getattr(expert, name)
    }
    return expert.model_copy(update=update) if update else expert


def classify(expert: Expert, stored: dict[str, Any] | None, digest: str) -> str:
    """``created``, ``updated`` or ``unchanged`` (by ``content_hash``; by the record hash when it is empty)."""
    if stored is None:
        return "created"
    if expert.content_hash:
        return "unchanged" if (stored.get("content_hash") or "") == expert.content_hash else "updated"
    return "unchanged" if stored.get("record_hash") == digest else "updated"


def expert_row(expert: Expert, digest: str | None = None) -> dict[str, Any]:
    """The ``UNWIND $rows`` row of one expert: its id, kind label, full property map and link targets."""
    props = expert.model_dump(mode="python", exclude={"id", "files", "embedding", "kind"})
    props.update(
        kind=expert.kind.value,
        files_json=json.dumps([f.model_dump(mode="json") for f in expert.files]),
        embedding=[float(x) for x in expert.embedding] if expert.embedding else None,
        record_hash=digest or record_hash(expert),
        commercial_use_ok=commercial_use_ok(expert.allow_commercial_use),
    )
    return {
        "id": expert.id,
        "label": expert.label,
        "props": props,
        "base_family": expert.base_family,
        "tags": [t for t in dict.fromkeys(t.strip() for t in expert.tags) if t],
        "creator": expert.creator,
    }


def expert_from_props(props: dict[str, Any]) -> Expert:
    """An ``Expert`` from a node's properties (unknown properties, e.g. added in Browser, are ignored)."""
    data = {k: to_native(v) for k, v in props.items() if k in Expert.model_fields or k == "files_json"}
    data["files"] = json.loads(data.pop("files_json", None) or "[]")
    if data.get("embedding"):
        data["embedding"] = [float(x) for x in data["embedding"]]
    else:
        data["embedding"] = None
    return Expert.model_validate(data)


def capability_props(cap: Capability) -> dict[str, Any]:
    """CAPABILITY properties: the fixed fields plus each metric as its own property."""
    clash = sorted(set(cap.metrics) & set(_CAPABILITY_FIELDS))
    if clash:
        raise GraphError(
            f"capability {cap.expert_id!r} -> {cap.prompt_id!r}: metric names {clash} are reserved"
        )
    return {
        **{name: float(value) for name, value in cap.metrics.items()},
        "score": float(cap.score),
        "n_images": int(cap.n_images),
        "calibrated_at": cap.calibrated_at,
        "ref_set_version": cap.ref_set_version,
    }


def capability_from_props(expert_id: str, prompt_id: str, props: dict[str, Any]) -> Capability:
    data = {k: to_native(v) for k, v in props.items()}
    metrics = {
        k: float(v) for k, v in data.items() if k not in _CAPABILITY_FIELDS and isinstance(v, int | float)
    }
    return Capability(
        expert_id=expert_id,
        prompt_id=prompt_id,
        score=float(data.get("score") or 0.0),
        metrics=metrics,
        n_images=int(data.get("n_images") or 0),
        calibrated_at=data.get("calibrated_at") or utcnow(),
        ref_set_version=data.get("ref_set_version") or "",
    )


def ref_prompt_row(prompt: RefPrompt) -> dict[str, Any]:
    props = prompt.model_dump(mode="python", exclude={"id", "embedding"})
    props["embedding"] = [float(x) for x in prompt.embedding] if prompt.embedding else None
    return {"id": prompt.id, "props": props}


def ref_prompt_from_props(props: dict[str, Any]) -> RefPrompt:
    data = {k: to_native(v) for k, v in props.items() if k in RefPrompt.model_fields}
    data["embedding"] = [float(x) for x in data["embedding"]] if data.get("embedding") else None
    return RefPrompt.model_validate(data)


def kinds_for(kind: ExpertKind | str | None) -> list[str] | None:
    """The ``kind`` values a kind filter matches: ``None`` (all), ``["checkpoint"]`` or every adapter kind
    (``lora`` — and any other adapter kind — matches lora, locon, loha and lokr)."""
    if kind is None or kind == "":
        return None
    try:
        parsed = ExpertKind(str(kind).lower())
    except ValueError as exc:
        raise GraphError(f"unknown expert kind {kind!r}; use one of {[k.value for k in ExpertKind]}") from exc
    return [k.value for k in ExpertKind if k.is_adapter == parsed.is_adapter]


def expert_filter_params(f: ExpertFilter) -> dict[str, Any]:
    """``ExpertFilter`` as the filter map of ``queries.find_experts_query`` (None = not filtered)."""
    return {
        "kind": kinds_for(f.kind),
        "base_family": f.base_family,
        "source": f.source,
        "tag": f.tag,
        "creator": f.creator,
        "uncalibrated_for": f.uncalibrated_for,
        "name_contains": f.name_contains,
    }


def top_k_similar(
    ids: Sequence[str], families: Sequence[str], matrix: np.ndarray, k: int
) -> list[tuple[str, str, float]]:
    """``(src, dst, cosine)`` for each expert's ``k`` most similar experts of its family (ties by id order;
    ``ids`` sorted); never an expert to itself."""
    if k <= 0 or not len(ids):
        return []
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    unit = matrix / np.maximum(norms, 1e-12)
    fam = np.asarray(families, dtype=object)
    out: list[tuple[str, str, float]] = []
    for family in sorted(set(fam.tolist()), key=str):
        rows = np.nonzero(fam == family)[0]
        sub = unit[rows]
        for start in range(0, len(rows), 1024):  # bounded score blocks
            block = sub[start : start + 1024] @ sub.T
            for j in range(block.shape[0]):
                block[j, start + j] = -np.inf
                scores = block[j]
                valid = np.nonzero(np.isfinite(scores))[0]
                order = valid[np.lexsort((valid, -scores[valid]))][:k]
                out.extend((ids[rows[start + j]], ids[rows[t]], float(scores[t])) for t in order)
    return out


def parse_version(versions: Sequence[str]) -> tuple[int, ...]:
    """``("5.26.0",)`` → ``(5, 26, 0)``; ``("2025.10.1",)`` → ``(2025, 10, 1)``; unknown → ``(0,)``."""
    for text in versions:
        m = re.match(r"(\d+)(?:\.(\d+))?(?:\.(\d+))?", str(text))
        if m:
            return tuple(int(g) for g in m.groups() if g is not None)
    return (0,)


def vector_index_mode(version: tuple[int, ...]) -> str:
    """``"ddl"`` (5.15+: ``CREATE VECTOR INDEX``), ``"procedure"`` (5.11-5.14) or ``"none"`` (brute force)."""
    if version >= (5, 15):
        return "ddl"
    if version >= (5, 11):
        return "procedure"
    return "none"


def _batched(rows: Sequence[T], size: int = BATCH_ROWS) -> Iterator[Sequence[T]]:
    for start in range(0, len(rows), size):
        yield rows[start : start + size]


def _missing_message(what: str, missing: Sequence[str]) -> str:
    shown = ", ".join(repr(m) for m in missing[:10])
    more = f" and {len(missing) - 10} more" if len(missing) > 10 else ""
    return f"unknown {what}{'s' if len(missing) > 1 else ''}: {shown}{more}"


def _one_line(exc: BaseException, limit: int = 300) -> str:
    """The error's message on one line (driver messages span several), bounded."""
    text = " ".join(str(getattr(exc, "message", None) or exc).split()).rstrip(":")
    return (text[:limit] + "...") if len(text) > limit else (text or type(exc).__name__)


# ------------------------------------------------------------------------------------ the store


class Neo4jGraphStore:
    """``GraphStore`` on a Neo4j 5.x / 202x server.

    Args:
        uri: ``neo4j://host:7687``, ``bolt://host:7687`` or their ``+s``/``+ssc`` TLS variants.
        user, password: basic-auth credentials.
        database: the database to use (default ``neo4j``).
        embedding_dim: dimension of the native vector index (default 384, all-MiniLM-L6-v2).
        connection_timeout_s: how long to wait for the server before ``GraphUnavailable``.

    Raises:
        GraphUnavailable: bad URL, unreachable server, rejected credentials or missing database.
    """

    def __init__(
        self,
        uri: str,
        user: str = "neo4j",
        password: str = "",
        database: str = "neo4j",
        *,
        embedding_dim: int = q.DEFAULT_EMBEDDING_DIM,
        connection_timeout_s: float = 10.0,
    ) -> None:
        import neo4j
        from neo4j import exceptions as nex

        self.uri = uri
        self.database = database
        self.embedding_dim = q._check_dimensions(embedding_dim)
        self._version: tuple[int, ...] | None = None
        self._vector_index: bool | None = None  # known after ensure_schema, else looked up on first use
        scheme = uri.split("://", 1)[0] if "://" in uri else ""
        if scheme not in SCHEMES or not uri.split("://", 1)[1].strip("/"):
            raise GraphUnavailable(f"bad Neo4j URL {uri!r}: use neo4j://host:7687 or bolt://host:7687")
        try:
            self._driver = neo4j.GraphDatabase.driver(
                uri,
                auth=(user, password),
                connection_timeout=connection_timeout_s,
                max_transaction_retry_time=15.0,
            )
        except (nex.ConfigurationError, ValueError) as exc:
            raise GraphUnavailable(f"bad Neo4j URL {uri!r}: {_one_line(exc)}") from exc
        try:
            with self._errors():
                self._driver.verify_connectivity()
            self._server_version()  # runs in ``database``: a missing database fails here, clearly
        except BaseException:
            self._driver.close()
            raise

    # lifecycle ---------------------------------------------------------------------------------
    def close(self) -> None:
        self._driver.close()

    def __enter__(self) -> Neo4jGraphStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def ensure_schema(self) -> None:
        """Uniqueness constraints, range indexes and (5.11+) the vector index on ``Expert.embedding``;
        idempotent. Waits until new indexes are online."""
        from neo4j import exceptions as nex

        for statement in [*q.CREATE_CONSTRAINT_QUERIES, *q.CREATE_INDEX_QUERIES]:
            self._execute(statement)
        mode = vector_index_mode(self._server_version())
        try:
            if mode == "ddl":
                self._execute(q.create_vector_index_query(self.embedding_dim)[0])
            elif mode == "procedure" and not self._execute(
                q.SHOW_INDEX_QUERY, index_name=q.VECTOR_INDEX_NAME
            ):
                self._execute(
                    q.CREATE_VECTOR_INDEX_PROCEDURE_QUERY,
                    index_name=q.VECTOR_INDEX_NAME,
                    dimensions=self.embedding_dim,
                )
            self._vector_index = mode != "none"
        except GraphError as exc:
            if not isinstance(exc.__cause__, nex.ClientError):
                raise
            self._vector_index = False  # e.g. an edition without vector indexes: brute force works everywhere
        self._execute(q.AWAIT_INDEXES_QUERY, timeout_s=300)

    def clear(self) -> None:
        """Test helper only: delete every node carrying a DiffGraph label (and its relationships)."""
        self._execute(q.CLEAR_QUERY)
        self._touch()

    # plumbing ----------------------------------------------------------------------------------
    @contextmanager
    def _errors(self) -> Iterator[None]:
        """Driver errors as one-line ``GraphUnavailable``/``GraphError`` (domain errors pass through)."""
        from neo4j import exceptions as nex

        try:
            yield
        except (GraphError, NotFoundError):
            raise
        except nex.AuthError as exc:
            raise GraphUnavailable(f"Neo4j at {self.uri} rejected the credentials: {_one_line(exc)}") from exc
        except (nex.ServiceUnavailable, nex.SessionExpired, OSError) as exc:
            raise GraphUnavailable(f"Neo4j is unreachable at {self.uri}: {_one_line(exc)}") from exc
        except nex.Neo4jError as exc:
            if "DatabaseNotFound" in (exc.code or ""):
                raise GraphUnavailable(
                    f"Neo4j database {self.database!r} does not exist at {self.uri}"
                ) from exc
            raise GraphError(f"Neo4j error {exc.code}: {_one_line(exc)}") from exc
        except nex.DriverError as exc:
            raise GraphError(f"Neo4j driver error: {_one_line(exc)}") from exc

    def _execute(self, query: str, read: bool = False, **params: Any) -> list[dict[str, Any]]:
        """One auto-retried statement (``driver.execute_query``); records as dicts."""
        from neo4j import RoutingControl

        with self._errors():
            records, _, _ = self._driver.execute_query(
                query,
                params,
                routing_=RoutingControl.READ if read else RoutingControl.WRITE,
                database_=self.database,
            )
        return [r.data() for r in records]

    def _read(self, query: str, **params: Any) -> list[dict[str, Any]]:
        return self._execute(query, read=True, **params)

    def _write(self, work: Callable[[Any], T]) -> T:
        """Run ``work(tx)`` as one managed write transaction (retried as a whole on transient errors)."""
        def renewing(tx: Any) -> T:
            result = work(tx)
            tx.run(q.TOUCH_DATA_VERSION_QUERY, data_version=uuid.uuid4().hex)
            return result

        with self._errors(), self._driver.session(database=self.database) as session:
            return session.execute_write(renewing)

    def _touch(self) -> None:
        """Renew the data version after a single-statement write (see ``graphdb/search.py``)."""
        self._execute(q.TOUCH_DATA_VERSION_QUERY, data_version=uuid.uuid4().hex)

    def search_corpus(self) -> SearchCorpus:
        """Every expert with the indexes retrieval ranks on, cached until the next write (``graphdb.search``)."""
        rows = self._read(q.DATA_VERSION_QUERY)
        version = str(rows[0]["value"]) if rows else ""
        return cached_corpus(
            f"neo4j:{self.uri}/{self.database}", version, lambda: self.find_experts(limit=ALL_EXPERTS)
        )

    def _server_version(self) -> tuple[int, ...]:
        if self._version is None:
            rows = self._read(q.SERVER_VERSION_QUERY)
            kernel = [r for r in rows if "kernel" in str(r.get("name", "")).lower()] or rows
            self._version = parse_version(kernel[0]["versions"] if kernel else [])
        return self._version

    def _has_vector_index(self) -> bool:
        if self._vector_index is None:
            rows = self._read(q.SHOW_INDEX_QUERY, index_name=q.VECTOR_INDEX_NAME)
            self._vector_index = any(r.get("state") == "ONLINE" for r in rows)
        return self._vector_index

    def _graph_dim(self) -> int | None:
        rows = self._read(q.EMBEDDING_DIM_QUERY)
        return int(rows[0]["dim"]) if rows else None

    def _check_dims(self, owners: Iterable[tuple[str, int]]) -> None:
        """Every embedding in the graph has one dimension: the first stored one fixes it."""
        stored = self._graph_dim()
        for owner, dim in owners:
            if stored is None:
                stored = dim
            elif dim != stored:
                raise GraphError(f"{owner}: embedding has {dim} dimensions, the graph stores {stored}")

    @staticmethod
    def _require(tx: Any, query: str, ids: Iterable[str], what: str) -> None:
        wanted = sorted(set(ids))
        if not wanted:
            return
        missing = tx.run(query, {"ids": wanted}).single()["missing"]
        if missing:
            raise NotFoundError(_missing_message(what, sorted(missing)))

    # experts -----------------------------------------------------------------------------------
    def upsert_experts(self, experts: Sequence[Expert]) -> UpsertResult:
        """Create or update experts and replace their BASED_ON/TAGGED/CREATED_BY links (a transaction per
        ``BATCH_ROWS`` experts).

        Counts by ``content_hash`` (by the whole record when it is empty); a changed hash clears stored
        calibration fields unless the incoming record sets them.
        """
        batch = unique_experts(experts)
        if not batch:
            return UpsertResult()
        self._check_dims((f"expert {e.id!r}", len(e.embedding)) for e in batch.values() if e.embedding)
        outcome: dict[str, list[str]] = {"created": [], "updated": [], "unchanged": []}
        # One transaction per chunk keeps transaction memory bounded for big crawls; experts are independent.
        for chunk_ids in _batched(list(batch)):
            chunk = {i: batch[i] for i in chunk_ids}
            for key, done in self._write(lambda tx, chunk=chunk: self._upsert_chunk(tx, chunk)).items():
                outcome[key].extend(done)
        return UpsertResult(
            created=len(outcome["created"]),
            updated=len(outcome["updated"]),
            unchanged=len(outcome["unchanged"]),
            created_ids=tuple(outcome["created"]),
            updated_ids=tuple(outcome["updated"]),
        )

    @staticmethod
    def _upsert_chunk(tx: Any, batch: dict[str, Expert]) -> dict[str, list[str]]:
        """Write one chunk of experts and their links; returns ids by outcome (created/updated/unchanged)."""
        ids = list(batch)
        stored = {r["id"]: r.data() for r in tx.run(q.STORED_EXPERT_STATE_QUERY, {"ids": ids})}
        outcome: dict[str, list[str]] = {"created": [], "updated": [], "unchanged": []}
        rows: list[dict[str, Any]] = []
        for expert_id, expert in batch.items():
            expert = with_stored_calibration(expert, stored.get(expert_id))
            digest = record_hash(expert)
            outcome[classify(expert, stored.get(expert_id), digest)].append(expert_id)
            rows.append(expert_row(expert, digest))
        for label in q.EXPERT_LABELS:
            labelled = [{"id": r["id"], "props": r["props"]} for r in rows if r["label"] == label]
            if labelled:
                tx.run(q.upsert_experts_query(label), {"rows": labelled}).consume()
        tx.run(q.DELETE_EXPERT_LINKS_QUERY, {"ids": ids}).consume()
        links = (
            (q.LINK_BASE_MODELS_QUERY, [r for r in rows if r["base_family"]]),
            (q.LINK_TAGS_QUERY, [r for r in rows if r["tags"]]),
            (q.LINK_CREATORS_QUERY, [r for r in rows if r["creator"]]),
        )
        for query, link_rows in links:
            if link_rows:
                slim = [{k: r[k] for k in ("id", "base_family", "tags", "creator")} for r in link_rows]
                tx.run(query, {"rows": slim}).consume()
        return outcome

    def get_expert(self, expert_id: str) -> Expert:
        rows = self._read(q.GET_EXPERT_QUERY, id=expert_id)
        if not rows:
            raise NotFoundError(f"unknown expert {expert_id!r}")
        return expert_from_props(rows[0]["expert"])

    def find_experts(self, filters: ExpertFilter | None = None, limit: int = 1000) -> list[Expert]:
        query, params = q.find_experts_query(
            expert_filter_params(filters or ExpertFilter()), max(0, int(limit))
        )
        return [expert_from_props(r["expert"]) for r in self._read(query, **params)]

    def delete_expert(self, expert_id: str) -> None:
        rows = self._execute(q.DELETE_EXPERT_QUERY, id=expert_id)
        self._touch()
        if not rows or not rows[0]["deleted"]:
            raise NotFoundError(f"unknown expert {expert_id!r}")

    def mark_calibrated(
        self, expert_id: str, ref_set_version: str, scorer_version: str, calibrated_at: datetime
    ) -> None:
        rows = self._execute(
            q.MARK_CALIBRATED_QUERY,
            id=expert_id,
            calibrated_at=calibrated_at,
            ref_set_version=ref_set_version,
            scorer_version=scorer_version,
        )
        self._touch()
        if not rows:
            raise NotFoundError(f"unknown expert {expert_id!r}")

    # reference prompts and capabilities ---------------------------------------------------------
    def upsert_ref_prompts(self, prompts: Sequence[RefPrompt]) -> int:
        batch = {p.id: p for p in prompts}
        if not batch:
            return 0
        for p in batch.values():
            if p.embedding:
                check_vector(f"reference prompt {p.id!r}", p.embedding)
        self._check_dims(
            (f"reference prompt {p.id!r}", len(p.embedding)) for p in batch.values() if p.embedding
        )
        rows = [ref_prompt_row(p) for p in batch.values()]

        def work(tx: Any) -> int:
            for chunk in _batched(rows):
                tx.run(q.UPSERT_REF_PROMPTS_QUERY, {"rows": chunk}).consume()
            return len(rows)

        return self._write(work)

    def list_ref_prompts(self, set_version: str | None = None) -> list[RefPrompt]:
        if set_version is None:
            rows = self._read(q.LIST_REF_PROMPTS_QUERY)
        else:
            rows = self._read(q.LIST_REF_PROMPTS_BY_VERSION_QUERY, set_version=set_version)
        return [ref_prompt_from_props(r["prompt"]) for r in rows]

    def write_capabilities(self, capabilities: Sequence[Capability]) -> int:
        """One CAPABILITY edge per (expert, prompt), all properties replaced; all-or-nothing on unknown ids."""
        batch = unique_capabilities(capabilities)
        if not batch:
            return 0
        rows = [{"expert_id": e, "prompt_id": p, "props": capability_props(c)} for (e, p), c in batch.items()]

        def work(tx: Any) -> int:
            self._require(tx, q.MISSING_EXPERT_IDS_QUERY, (e for e, _ in batch), "expert")
            self._require(tx, q.MISSING_REF_PROMPT_IDS_QUERY, (p for _, p in batch), "reference prompt")
            for chunk in _batched(rows):
                tx.run(q.WRITE_CAPABILITIES_QUERY, {"rows": chunk}).consume()
            return len(rows)

        return self._write(work)

    def get_capabilities(
        self, expert_id: str | None = None, prompt_id: str | None = None
    ) -> list[Capability]:
        query, params = q.get_capabilities_query(expert_id, prompt_id)
        return [
            capability_from_props(r["expert_id"], r["prompt_id"], r["capability"])
            for r in self._read(query, **params)
        ]

    # similarity and retrieval --------------------------------------------------------------------
    def link_similar(self, k: int = 5) -> int:
        """Recompute SIMILAR_TO from scratch: each expert to its ``k`` nearest experts of the same family."""
        rows = self._read(q.EXPERT_EMBEDDINGS_QUERY)
        dim = self._graph_dim()
        rows = [r for r in rows if len(r["embedding"]) == dim]
        ids = [r["id"] for r in rows]
        families = [r["base_family"] or "" for r in rows]
        matrix = np.asarray([r["embedding"] for r in rows], dtype=np.float32).reshape(len(rows), -1)
        edges = [{"src": s, "dst": d, "score": sc} for s, d, sc in top_k_similar(ids, families, matrix, k)]

        def work(tx: Any) -> int:
            tx.run(q.DELETE_SIMILAR_QUERY).consume()
            for chunk in _batched(edges):
                tx.run(q.CREATE_SIMILAR_QUERY, {"rows": chunk}).consume()
            return len(edges)

        return self._write(work)

    def candidates(
        self,
        embedding: Sequence[float] | np.ndarray,
        kind: ExpertKind | str | None = None,
        base_family: str | None = None,
        k: int = 20,
        filters: CandidateFilter | None = None,
    ) -> list[Candidate]:
        """Top-``k`` experts by cosine similarity, best first, ties broken by id.

        Uses the native vector index when there is one (widening its candidate pool until the filters
        leave ``k`` or the pool holds every expert), else exact cosine computed in Cypher.
        """
        query = check_vector("query", embedding)
        f = filters or CandidateFilter()
        kinds = kinds_for(kind)
        if k <= 0:
            return []
        total = int(self._read(q.COUNT_EMBEDDED_EXPERTS_QUERY)[0]["n"])
        if total == 0:
            return []
        dim = self._graph_dim()
        if dim is not None and query.size != dim:
            raise GraphError(f"query embedding has {query.size} dimensions, the graph stores {dim}")
        params = {
            "embedding": query.tolist(),
            "k": int(k),
            "kinds": kinds,
            "base_family": base_family or None,
            "allow_nsfw": bool(f.allow_nsfw),
            "require_commercial_use": bool(f.require_commercial_use),
            "require_derivatives": bool(f.require_derivatives),
            "exclude_ids": sorted(f.exclude_ids),
        }
        rows: list[dict[str, Any]] | None = None
        if self._has_vector_index() and query.size == self.embedding_dim:
            limit = min(total, MAX_VECTOR_FETCH)
            fetch = min(limit, max(4 * k, 50))
            while True:
                rows = self._read(
                    q.CANDIDATES_VECTOR_INDEX_QUERY, index_name=q.VECTOR_INDEX_NAME, fetch=fetch, **params
                )
                if len(rows) >= k or fetch >= limit:
                    break
                fetch = min(limit, fetch * 4)
            if len(rows) < k and limit < total:
                rows = None  # filters too strict for the index's pool: exact search instead
        if rows is None:
            rows = self._read(
                q.CANDIDATES_BRUTE_FORCE_QUERY, query_norm=float(np.linalg.norm(query)), **params
            )
        return rank_candidates([expert_from_props(r["expert"]) for r in rows], query, k)

    # activation ----------------------------------------------------------------------------------
    def activate_subgraph(
        self, expert_ids: Sequence[str], prompt_embedding: Sequence[float] | np.ndarray | None = None
    ) -> Subgraph:
        """Selected experts + their CAPABILITY edges and reference prompts + SIMILAR_TO neighbours."""
        ids = list(dict.fromkeys(expert_ids))
        dim = self._graph_dim() or q.DEFAULT_EMBEDDING_DIM
        found = {
            r["expert"]["id"]: expert_from_props(r["expert"])
            for r in self._read(q.GET_EXPERTS_QUERY, ids=ids)
        }
        missing = [i for i in ids if i not in found]
        if missing:
            raise NotFoundError(_missing_message("expert", missing))
        similar = self._read(q.ACTIVATION_SIMILAR_QUERY, ids=ids)
        neighbour_ids = [
            i for i in dict.fromkeys(x for r in similar for x in (r["src"], r["dst"])) if i not in found
        ]
        if neighbour_ids:
            for r in self._read(q.GET_EXPERTS_QUERY, ids=neighbour_ids):
                found[r["expert"]["id"]] = expert_from_props(r["expert"])
        caps = self._read(q.ACTIVATION_CAPABILITIES_QUERY, ids=ids)
        sub = build_subgraph([found[i] for i in [*ids, *neighbour_ids]], similar, caps, dim)
        if prompt_embedding is not None:
            vector = check_vector("prompt", prompt_embedding)
            if vector.size != dim:
                raise GraphError(f"prompt embedding has {vector.size} dimensions, the graph stores {dim}")
            sub = sub.with_prompt("", vector)
        return sub

    # generations and stats -----------------------------------------------------------------------
    def record_generation(
        self,
        generation_id: str,
        prompt: str,
        used: Sequence[tuple[str, float]],
        created_at: datetime | None = None,
    ) -> None:
        """Create or replace the :Generation ``generation_id`` and its USED edges (idempotent)."""
        if not generation_id:
            raise GraphError("a generation needs an id")
        coefficients: dict[str, float] = {}
        for expert_id, coefficient in used:
            if not math.isfinite(float(coefficient)):
                raise GraphError(f"generation {generation_id!r}: non-finite coefficient for {expert_id!r}")
            coefficients[expert_id] = float(coefficient)
        rows = [{"expert_id": e, "coefficient": c} for e, c in coefficients.items()]

        def work(tx: Any) -> None:
            self._require(tx, q.MISSING_EXPERT_IDS_QUERY, coefficients, "expert")
            tx.run(
                q.MERGE_GENERATION_QUERY,
                {
                    "id": generation_id,
                    "prompt": prompt[:MAX_PROMPT_CHARS],
                    "created_at": created_at,
                    "now": utcnow(),
                },
            ).consume()
            if rows:
                tx.run(q.LINK_GENERATION_QUERY, {"id": generation_id, "used": rows}).consume()

        self._write(work)

    def stats(self) -> GraphStats:
        nodes = {r["name"]: int(r["n"]) for r in self._read(q.NODE_COUNTS_QUERY)}
        rels = {r["name"]: int(r["n"]) for r in self._read(q.RELATIONSHIP_COUNTS_QUERY)}
        return GraphStats(
            nodes={label: nodes.get(label, 0) for label in NODE_LABELS},
            relationships={rel: rels.get(rel, 0) for rel in REL_TYPES},
        )


# ------------------------------------------------------------------------------------ result assembly


def rank_candidates(experts: Sequence[Expert], query: np.ndarray, k: int) -> list[Candidate]:
    """Exact cosine of each expert's embedding to ``query``, best first, ties by id, at most ``k``."""
    qn = query / max(float(np.linalg.norm(query)), 1e-12)
    scored = []
    for e in experts:
        if not e.embedding or len(e.embedding) != query.size:
            continue
        v = np.asarray(e.embedding, dtype=np.float64)
        scored.append((float(v @ qn / max(float(np.linalg.norm(v)), 1e-12)), e))
    scored.sort(key=lambda t: (-round(t[0], 6), t[1].id))  # float noise must not beat the id tie-break
    return [Candidate(e, s) for s, e in scored[:k]]


def _expert_node(e: Expert) -> SubgraphNode:
    return SubgraphNode(
        e.id,
        "checkpoint" if e.kind is ExpertKind.checkpoint else "lora",
        text=e.name,
        family=e.base_family,
        popularity=float(e.popularity or 0.0),
    )


def build_subgraph(
    experts: Sequence[Expert],
    similar: Sequence[dict[str, Any]],
    capabilities: Sequence[dict[str, Any]],
    dim: int,
) -> Subgraph:
    """Assemble a ``Subgraph`` from query rows: experts (selected, then neighbours) in the given order,
    then the reference prompts by id; SIMILAR_TO edges, then CAPABILITY edges with their metrics.

    ``similar`` rows have ``src``, ``dst``, ``score``; ``capabilities`` rows have ``expert_id``,
    ``prompt`` (node properties) and ``capability`` (edge properties). Missing embeddings are zero rows.
    """
    nodes = [_expert_node(e) for e in experts]
    vectors = [e.embedding if e.embedding and len(e.embedding) == dim else None for e in experts]
    edges: dict[tuple[str, str, str], SubgraphEdge] = {}
    for r in similar:
        edges[(r["src"], r["dst"], "SIMILAR_TO")] = SubgraphEdge(
            r["src"], r["dst"], "SIMILAR_TO", float(r["score"])
        )
    prompts: dict[str, RefPrompt] = {}
    for r in capabilities:
        prompt = ref_prompt_from_props(r["prompt"])
        prompts[prompt.id] = prompt
        cap = capability_from_props(r["expert_id"], prompt.id, r["capability"])
        edges[(cap.expert_id, cap.prompt_id, "CAPABILITY")] = SubgraphEdge(
            cap.expert_id, cap.prompt_id, "CAPABILITY", cap.score, dict(cap.metrics)
        )
    for pid in sorted(prompts):
        p = prompts[pid]
        nodes.append(SubgraphNode(p.id, "refprompt", text=p.text, category=p.category))
        vectors.append(p.embedding if p.embedding and len(p.embedding) == dim else None)
    matrix = np.zeros((len(nodes), dim), dtype=np.float32)
    for i, v in enumerate(vectors):
        if v is not None:
            matrix[i] = v
    return Subgraph(nodes=nodes, edges=list(edges.values()), embeddings=matrix)
