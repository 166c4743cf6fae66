"""``Neo4jGraphStore``: the ``GraphStore`` contract over the official ``neo4j`` driver.

Every statement comes from ``graphdb.neo4j.queries`` and every backend-independent decision from
``graphdb.rules``; this module owns the mapping between domain models and rows (``expert_row`` /
``expert_from_props`` and friends, pure functions) and the transactions.
Multi-statement writes run as managed transactions (``session.execute_write``), which the driver retries
on transient errors; each transaction function re-reads what it depends on, so a retry is safe.

Semantics match the embedded backend (``graphdb/embedded/store.py``); the contract suite in
``tests/graphdb/test_contract.py`` runs against both when ``NEO4J_URI`` is set.
"""

from __future__ import annotations

import json
import logging
import re
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from datetime import date, datetime
from typing import Any, TypeVar

import numpy as np

from core.types import Capability, Expert, ExpertKind, NotFoundError, RefPrompt, utcnow
from graphdb import rules
from graphdb.errors import GraphBusy, GraphError, GraphUnavailable
from graphdb.neo4j import drivers
from graphdb.neo4j import queries as q
from graphdb.rules import (  # noqa: F401 - classify, record_hash... keep their old import path here
    check_vector,
    classify,
    commercial_use_ok,
    rank_candidates,
    record_hash,
    top_k_similar,
)
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

T = TypeVar("T")

log = logging.getLogger(__name__)
SCHEMES = ("neo4j", "neo4j+s", "neo4j+ssc", "bolt", "bolt+s", "bolt+ssc")
BATCH_ROWS = 1000  # rows per UNWIND statement
MAX_VECTOR_FETCH = 10_000  # largest vector-index pool before candidates() switches to exact search
# CAPABILITY properties that are not metrics (metrics are stored flat beside them, readable in Browser)
_CAPABILITY_FIELDS = ("score", "n_images", "calibrated_at", "ref_set_version")
_INTERNAL_EXPERT_PROPS = ("files_json", "record_hash", "commercial_use_ok")


# ------------------------------------------------------------------------------------ pure row mapping


def to_native(value: Any) -> Any:
    """Driver values as plain Python (``neo4j.time`` types to ``datetime``/``date``, lists recursively)."""
    if isinstance(value, list):
        return [to_native(v) for v in value]
    to_native_method = getattr(value, "to_native", None)
    if callable(to_native_method) and not isinstance(value, (datetime, date)):
        return to_native_method()
    return value


def with_stored_calibration(expert: Expert, stored: dict[str, Any] | None) -> Expert:
    """``rules.with_stored_calibration`` over a stored row as the driver returns it."""
    native = None if stored is None else {k: to_native(v) for k, v in stored.items()}
    return rules.with_stored_calibration(expert, native)


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
    links = rules.link_targets(expert)
    return {
        "id": expert.id,
        "label": expert.label,
        "props": props,
        "base_family": expert.base_family,
        "tags": links["TAGGED"],
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


kinds_for = rules.kind_values


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


def vector_index_dim(options: Any) -> int | None:
    """``vector.dimensions`` from a ``SHOW INDEXES`` options map, if present."""
    config = (options or {}).get("indexConfig") or {} if isinstance(options, dict) else {}
    value = config.get("vector.dimensions")
    return int(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _batched(rows: Sequence[T], size: int = BATCH_ROWS) -> Iterator[Sequence[T]]:
    for start in range(0, len(rows), size):
        yield rows[start : start + size]


_missing_message = rules.missing_message


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
        embedding_dim: int | None = None,
        connection_timeout_s: float = 10.0,
    ) -> None:
        from neo4j import exceptions as nex

        self.uri = uri
        self.database = database
        # the vector index's size for an empty graph; otherwise the stored embeddings decide (vector_index_dim)
        self.embedding_dim = q._check_dimensions(embedding_dim) if embedding_dim is not None else None
        scheme = uri.split("://", 1)[0] if "://" in uri else ""
        if scheme not in SCHEMES or not uri.split("://", 1)[1].strip("/"):
            raise GraphUnavailable(f"bad Neo4j URL {uri!r}: use neo4j://host:7687 or bolt://host:7687")
        try:  # one driver per process and credentials (graphdb.neo4j.drivers), not one per session
            self._shared = drivers.shared_driver(uri, user, password, connection_timeout=connection_timeout_s,
                                                 max_transaction_retry_time=15.0)
        except (nex.ConfigurationError, ValueError) as exc:
            raise GraphUnavailable(f"bad Neo4j URL {uri!r}: {_one_line(exc)}") from exc
        self._driver = self._shared.driver
        self._db = self._shared.database(database)
        try:
            if not self._shared.verified:
                with self._errors():
                    self._driver.verify_connectivity()
                self._shared.verified = True
            self._server_version()  # runs in ``database``: a missing database fails here, clearly
        except BaseException:
            drivers.discard(uri, user, password)  # the next session starts afresh
            raise

    # lifecycle ---------------------------------------------------------------------------------
    def close(self) -> None:
        """Nothing to release: the driver is shared by the process (closed at exit)."""

    def __enter__(self) -> Neo4jGraphStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def ensure_schema(self) -> None:
        """Uniqueness constraints, range indexes and (5.11+) the vector index on ``Expert.embedding``, once
        per database and process; idempotent. The vector index is sized from the stored embeddings (or
        ``embedding_dim``); on an empty graph it is created with the first embeddings written."""
        with self._db.lock:
            if self._db.schema_ready:
                return
            for statement in [*q.CREATE_CONSTRAINT_QUERIES, *q.CREATE_INDEX_QUERIES]:
                self._execute(statement)
            dim = self._graph_dim() or self.embedding_dim
            if dim:
                self._size_vector_index(dim)
            self._execute(q.AWAIT_INDEXES_QUERY, timeout_s=300)
            self._db.schema_ready = True

    def _size_vector_index(self, dim: int) -> None:
        """Make the vector index ``dim``-dimensional: create it, or replace one of another size."""
        from neo4j import exceptions as nex

        mode = vector_index_mode(self._server_version())
        if mode == "none":
            self._db.index_dim = 0
            return
        rows = self._read(q.SHOW_VECTOR_INDEX_QUERY, index_name=q.VECTOR_INDEX_NAME)
        existing = vector_index_dim(rows[0].get("options")) if rows else None
        if existing == dim:
            self._db.index_dim = dim
            return
        try:
            if rows:
                log.warning("Neo4j vector index %s has %s dimensions, the embeddings %d: recreating it",
                            q.VECTOR_INDEX_NAME, existing, dim)
                self._execute(q.DROP_VECTOR_INDEX_QUERY)
            if mode == "ddl":
                self._execute(q.create_vector_index_query(dim)[0])
            else:
                self._execute(q.CREATE_VECTOR_INDEX_PROCEDURE_QUERY, index_name=q.VECTOR_INDEX_NAME, dimensions=dim)
            self._execute(q.AWAIT_INDEXES_QUERY, timeout_s=300)
            self._db.index_dim = dim
        except GraphError as exc:
            if not isinstance(exc.__cause__, nex.ClientError):
                raise
            self._db.index_dim = 0  # e.g. an edition without vector indexes: brute force works everywhere

    def _index_new_embeddings(self, dims: Iterable[int]) -> None:
        """After the first embeddings are written to a graph without a vector index, create it."""
        dim = next(iter(dims), None)
        if dim and self._db.index_dim is None:
            with self._db.lock:
                if self._db.index_dim is None:
                    self._size_vector_index(dim)

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
        except nex.TransientError as exc:  # outlived the driver's own retries (deadlock, leader switch...)
            raise GraphBusy(f"Neo4j is busy at {self.uri}: {_one_line(exc)}") from exc
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
        if self._db.version is None:
            rows = self._read(q.SERVER_VERSION_QUERY)
            kernel = [r for r in rows if "kernel" in str(r.get("name", "")).lower()] or rows
            self._db.version = parse_version(kernel[0]["versions"] if kernel else [])
        return self._db.version

    def _vector_index_dim(self) -> int:
        """The online vector index's dimension, 0 when there is none (then candidates are exact)."""
        if self._db.index_dim is None:
            rows = self._read(q.SHOW_VECTOR_INDEX_QUERY, index_name=q.VECTOR_INDEX_NAME)
            online = [r for r in rows if r.get("state") == "ONLINE"]
            return (vector_index_dim(online[0].get("options")) or 0) if online else 0
        return self._db.index_dim

    def _graph_dim(self) -> int | None:
        rows = self._read(q.EMBEDDING_DIM_QUERY)
        return int(rows[0]["dim"]) if rows else None

    def _check_dims(self, owners: Iterable[tuple[str, int]]) -> None:
        """Every embedding in the graph has one dimension (the stored embeddings carry it)."""
        rules.check_dimensions(self._graph_dim(), owners)

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
        batch = rules.unique_experts(experts)
        if not batch:
            return UpsertResult()
        self._check_dims(rules.embedding_dims(batch.values()))
        outcome: dict[str, list[str]] = {"created": [], "updated": [], "unchanged": []}
        # One transaction per chunk keeps transaction memory bounded for big crawls; experts are independent.
        for chunk_ids in _batched(list(batch)):
            chunk = {i: batch[i] for i in chunk_ids}
            for key, done in self._write(lambda tx, chunk=chunk: self._upsert_chunk(tx, chunk)).items():
                outcome[key].extend(done)
        self._index_new_embeddings(len(e.embedding) for e in batch.values() if e.embedding)
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
        batch = rules.unique_ref_prompts(prompts)
        if not batch:
            return 0
        self._check_dims(rules.embedding_dims(batch.values(), "reference prompt"))
        rows = [ref_prompt_row(p) for p in batch.values()]

        def work(tx: Any) -> int:
            for chunk in _batched(rows):
                tx.run(q.UPSERT_REF_PROMPTS_QUERY, {"rows": chunk}).consume()
            return len(rows)

        written = self._write(work)
        self._index_new_embeddings(len(p.embedding) for p in batch.values() if p.embedding)
        return written

    def list_ref_prompts(self, set_version: str | None = None) -> list[RefPrompt]:
        if set_version is None:
            rows = self._read(q.LIST_REF_PROMPTS_QUERY)
        else:
            rows = self._read(q.LIST_REF_PROMPTS_BY_VERSION_QUERY, set_version=set_version)
        return [ref_prompt_from_props(r["prompt"]) for r in rows]

    def write_capabilities(self, capabilities: Sequence[Capability]) -> int:
        """One CAPABILITY edge per (expert, prompt), all properties replaced; all-or-nothing on unknown ids."""
        batch = rules.unique_capabilities(capabilities)
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
        matrix = np.asarray([r["embedding"] for r in rows], dtype=np.float32).reshape(len(rows), -1)
        similar = rules.top_k_similar([r["id"] for r in rows], [r["base_family"] for r in rows], matrix, k)
        edges = [{"src": s, "dst": d, "score": sc} for s, d, sc in similar]

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
        query = rules.check_vector("query", embedding)
        f = filters or CandidateFilter()
        kinds = rules.kind_values(kind)
        if k <= 0:
            return []
        total = int(self._read(q.COUNT_EMBEDDED_EXPERTS_QUERY)[0]["n"])
        if total == 0:
            return []
        rules.check_query_dimension("query", query, self._graph_dim())
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
        if query.size == self._vector_index_dim():
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
        return rules.rank_candidates([expert_from_props(r["expert"]) for r in rows], query, k)

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
        rules.require_known("expert", ids, found)
        similar = self._read(q.ACTIVATION_SIMILAR_QUERY, ids=ids)
        neighbour_ids = rules.neighbour_ids(ids, [(r["src"], r["dst"], r["score"]) for r in similar])
        if neighbour_ids:
            for r in self._read(q.GET_EXPERTS_QUERY, ids=neighbour_ids):
                found[r["expert"]["id"]] = expert_from_props(r["expert"])
        caps = self._read(q.ACTIVATION_CAPABILITIES_QUERY, ids=ids)
        sub = build_subgraph([found[i] for i in [*ids, *neighbour_ids] if i in found], similar, caps, dim)
        return rules.attach_prompt(sub, prompt_embedding, dim)

    # generations and stats -----------------------------------------------------------------------
    def record_generation(
        self,
        generation_id: str,
        prompt: str,
        used: Sequence[tuple[str, float]],
        created_at: datetime | None = None,
    ) -> None:
        """Create or replace the :Generation ``generation_id`` and its USED edges (idempotent)."""
        coefficients = rules.generation_coefficients(generation_id, used)
        rows = [{"expert_id": e, "coefficient": c} for e, c in coefficients.items()]

        def work(tx: Any) -> None:
            self._require(tx, q.MISSING_EXPERT_IDS_QUERY, coefficients, "expert")
            tx.run(
                q.MERGE_GENERATION_QUERY,
                {
                    "id": generation_id,
                    "prompt": rules.generation_prompt(prompt),
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


def build_subgraph(
    experts: Sequence[Expert],
    similar: Sequence[dict[str, Any]],
    capabilities: Sequence[dict[str, Any]],
    dim: int,
) -> Subgraph:
    """``rules.assemble_subgraph`` over query rows: ``similar`` rows have ``src``, ``dst``, ``score``;
    ``capabilities`` rows have ``expert_id``, ``prompt`` (node properties) and ``capability`` (edge
    properties). ``experts`` are the selected experts, then the neighbours."""
    prompts: dict[str, tuple[SubgraphNode, list[float] | None]] = {}
    caps = []
    for r in capabilities:
        prompt = ref_prompt_from_props(r["prompt"])
        prompts[prompt.id] = (
            SubgraphNode(prompt.id, "refprompt", text=prompt.text, category=prompt.category),
            prompt.embedding,
        )
        cap = capability_from_props(r["expert_id"], prompt.id, r["capability"])
        caps.append((cap.expert_id, cap.prompt_id, cap.score, cap.metrics))
    return rules.assemble_subgraph(
        [(rules.expert_node_of(e), e.embedding) for e in experts],
        [(r["src"], r["dst"], float(r["score"])) for r in similar],
        caps,
        prompts,
        dim,
    )
