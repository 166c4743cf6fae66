"""The backend-independent rules of the expert graph, as pure functions (no I/O, no backend imports).

Both backends (``graphdb/embedded``, ``graphdb/neo4j``) read and write rows; every decision about what the
rows mean is taken here, once, so the backends cannot drift apart: batch validation, the record hash and
upsert classification (with the rule that keeps calibration fields), kind-filter expansion, the one
embedding dimension, missing-id errors, generation records, cosine ranking with its tie-break, the
per-family SIMILAR_TO neighbours and subgraph assembly. ``tests/graphdb/test_rules.py`` checks them on
the CPU; the contract suite checks that both backends apply them.

Scores are compared at ``SCORE_DECIMALS`` decimals, ties broken by expert id: BLAS (and float32 storage)
may round identical rows differently in the last bits, and that noise must not decide an order.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from core.types import MAX_TEXT, Capability, Expert, ExpertKind, NotFoundError, RefPrompt
from graphdb.errors import GraphError
from graphdb.store import Candidate
from graphdb.subgraph import Subgraph, SubgraphEdge, SubgraphNode

SCORE_DECIMALS = 6
CALIBRATION_FIELDS = ("calibrated_at", "ref_set_version", "scorer_version")
_NO_COMMERCIAL = {"", "none", "false", "no", "0"}
_SIMILAR_BLOCK_CELLS = 1 << 24  # score cells per block of the SIMILAR_TO computation (bounds its memory)

# ------------------------------------------------------------------------------------ batch validation


def commercial_use_ok(value: str) -> bool:
    """Whether a source's ``allow_commercial_use`` value permits some commercial use (empty, ``None``,
    ``false``... or an empty ``{}``/``[]`` list do not). Both backends filter candidates by this rule."""
    return value.strip().strip("{}[]").lower() not in _NO_COMMERCIAL


def check_vector(owner: str, vector: Sequence[float] | np.ndarray, dtype: type = np.float32) -> np.ndarray:
    """A finite, non-empty 1-d vector, else ``GraphError`` naming ``owner``."""
    arr = np.asarray(vector, dtype=dtype).reshape(-1)
    if arr.size == 0:
        raise GraphError(f"{owner}: empty embedding")
    if not np.all(np.isfinite(arr)):
        raise GraphError(f"{owner}: embedding has non-finite values")
    return arr


def unique_experts(experts: Sequence[Expert]) -> dict[str, Expert]:
    """The batch of an ``upsert_experts`` call validated and keyed by id (the last record of an id wins)."""
    batch: dict[str, Expert] = {}
    for expert in experts:
        if not isinstance(expert, Expert):
            raise GraphError(f"upsert_experts expects Expert records, got {type(expert).__name__}")
        if expert.embedding is not None and len(expert.embedding) == 0:
            expert = expert.model_copy(update={"embedding": None})
        if expert.embedding is not None:
            check_vector(f"expert {expert.id!r}", expert.embedding)
        batch[expert.id] = expert
    return batch


def unique_ref_prompts(prompts: Sequence[RefPrompt]) -> dict[str, RefPrompt]:
    """The batch of an ``upsert_ref_prompts`` call validated and keyed by id (the last wins)."""
    batch = {p.id: p for p in prompts}
    for p in batch.values():
        if p.embedding:
            check_vector(f"reference prompt {p.id!r}", p.embedding)
    return batch


def unique_capabilities(capabilities: Sequence[Capability]) -> dict[tuple[str, str], Capability]:
    """The batch of a ``write_capabilities`` call validated and keyed by (expert, prompt); the last wins."""
    batch: dict[tuple[str, str], Capability] = {}
    for cap in capabilities:
        if not math.isfinite(cap.score) or not all(math.isfinite(v) for v in cap.metrics.values()):
            raise GraphError(f"capability {cap.expert_id!r} -> {cap.prompt_id!r}: non-finite score or metric")
        batch[(cap.expert_id, cap.prompt_id)] = cap
    return batch


def embedding_dims(experts: Iterable[Expert | RefPrompt], what: str = "expert") -> list[tuple[str, int]]:
    """``(owner, dimension)`` of each record that carries an embedding (the input of ``check_dimensions``)."""
    return [(f"{what} {r.id!r}", len(r.embedding)) for r in experts if r.embedding]


def check_dimensions(stored: int | None, owners: Iterable[tuple[str, int]]) -> int | None:
    """Every embedding in the graph has one dimension: the stored one, else the first written fixes it.

    Returns the graph's dimension after the write (``None`` while no embedding exists); raises
    ``GraphError`` naming the first owner that differs, before anything is written.
    """
    expected = stored
    for owner, dim in owners:
        if expected is None:
            expected = dim
        elif dim != expected:
            raise GraphError(f"{owner}: embedding has {dim} dimensions, the graph stores {expected}")
    return expected


def check_query_dimension(what: str, vector: np.ndarray, dim: int | None) -> None:
    """A query or prompt embedding must have the graph's dimension (any, while the graph has none)."""
    if dim is not None and vector.size != dim:
        raise GraphError(f"{what} embedding has {vector.size} dimensions, the graph stores {dim}")


def missing_message(what: str, missing: Sequence[str]) -> str:
    """``unknown expert: 'a'`` / ``unknown experts: 'a', 'b' ... and 3 more`` (at most 10 named)."""
    shown = ", ".join(repr(m) for m in missing[:10])
    more = f" and {len(missing) - 10} more" if len(missing) > 10 else ""
    return f"unknown {what}{'s' if len(missing) > 1 else ''}: {shown}{more}"


def require_known(what: str, wanted: Iterable[str], known: Iterable[str]) -> None:
    """``NotFoundError`` naming every id of ``wanted`` that is not ``known``, sorted."""
    missing = sorted(set(wanted) - set(known))
    if missing:
        raise NotFoundError(missing_message(what, missing))


# ------------------------------------------------------------------------------------ kinds


def parse_kind(kind: ExpertKind | str | None) -> ExpertKind | None:
    """A kind filter as an ``ExpertKind`` (``None`` or ``""``: no filter); unknown kinds are a ``GraphError``."""
    if kind is None or kind == "":
        return None
    try:
        return ExpertKind(str(kind).lower())
    except ValueError as exc:
        raise GraphError(f"unknown expert kind {kind!r}; use one of {[k.value for k in ExpertKind]}") from exc


def kind_label(kind: ExpertKind | str | None) -> str | None:
    """The label a kind filter matches: ``None`` (all), ``"Checkpoint"`` or ``"LoRA"`` (every adapter kind)."""
    parsed = parse_kind(kind)
    return None if parsed is None else parsed.label


def kind_values(kind: ExpertKind | str | None) -> list[str] | None:
    """The ``kind`` values a kind filter matches: ``None`` (all), ``["checkpoint"]`` or every adapter kind
    (``lora`` — and any other adapter kind — matches lora, locon, loha and lokr)."""
    parsed = parse_kind(kind)
    if parsed is None:
        return None
    return [k.value for k in ExpertKind if k.label == parsed.label]


# ------------------------------------------------------------------------------------ expert records


def record_json(expert: Expert) -> str:
    """The record as canonical JSON, without the embedding and the calibration fields."""
    return json.dumps(
        expert.model_dump(mode="json", exclude={*CALIBRATION_FIELDS, "embedding"}), sort_keys=True
    )


def record_hash(expert: Expert, record: str | None = None) -> str:
    """Hash of the whole record except calibration fields (change detection when ``content_hash`` is empty).

    ``record`` is ``record_json(expert)`` when the caller already has it.
    """
    digest = hashlib.sha256((record if record is not None else record_json(expert)).encode())
    if expert.embedding:
        digest.update(np.asarray(expert.embedding, dtype=np.float32).tobytes())
    return digest.hexdigest()


def with_stored_calibration(expert: Expert, stored: Mapping[str, Any] | None) -> Expert:
    """Apply the calibration rule: an unchanged ``content_hash`` keeps each stored calibration field the
    new record leaves empty; a changed hash keeps nothing (the expert needs recalibration).

    ``stored`` holds the stored ``content_hash`` and calibration fields as Python values (a datetime for
    ``calibrated_at``); ``None`` when the expert is new.
    """
    if stored is None or (stored.get("content_hash") or "") != expert.content_hash:
        return expert
    update = {
        name: stored.get(name) or (None if name == "calibrated_at" else "")
        for name in CALIBRATION_FIELDS
        if not getattr(expert, name)
    }
    return expert.model_copy(update=update) if update else expert


def classify(expert: Expert, stored: Mapping[str, Any] | None, digest: str) -> str:
    """``created``, ``updated`` or ``unchanged`` (by ``content_hash``; by the record hash when it is empty)."""
    if stored is None:
        return "created"
    if expert.content_hash:
        return "unchanged" if (stored.get("content_hash") or "") == expert.content_hash else "updated"
    return "unchanged" if stored.get("record_hash") == digest else "updated"


def link_targets(expert: Expert) -> dict[str, list[str]]:
    """The BASED_ON / TAGGED / CREATED_BY targets of an expert (tags stripped, deduplicated, no empties)."""
    return {
        "BASED_ON": [expert.base_family] if expert.base_family else [],
        "TAGGED": [t for t in dict.fromkeys(t.strip() for t in expert.tags) if t],
        "CREATED_BY": [expert.creator] if expert.creator else [],
    }


# ------------------------------------------------------------------------------------ generations


def generation_coefficients(generation_id: str, used: Iterable[tuple[str, float]]) -> dict[str, float]:
    """The USED coefficient of each expert of a generation record (the last of an id wins); the id must be
    set and every coefficient finite, else ``GraphError``."""
    if not generation_id:
        raise GraphError("a generation needs an id")
    coefficients: dict[str, float] = {}
    for expert_id, coefficient in used:
        if not math.isfinite(float(coefficient)):
            raise GraphError(f"generation {generation_id!r}: non-finite coefficient for {expert_id!r}")
        coefficients[expert_id] = float(coefficient)
    return coefficients


def generation_prompt(prompt: str) -> str:
    """A :Generation keeps the prompt it was made for, bounded like any free text on a node (``MAX_TEXT``;
    requests are already held to ``core.types.MAX_PROMPT_CHARS``)."""
    return prompt[:MAX_TEXT]


# ------------------------------------------------------------------------------------ ranking


def score_keys(scores: np.ndarray) -> np.ndarray:
    """Scores as int64 keys at ``SCORE_DECIMALS`` decimals (finite scores only)."""
    return np.rint(np.asarray(scores, dtype=np.float64) * 10**SCORE_DECIMALS).astype(np.int64)


def rounded_score(score: float) -> float:
    return round(float(score), SCORE_DECIMALS)


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` best finite scores, best first; ties (at ``SCORE_DECIMALS``) keep index order,
    so callers whose rows are sorted by id get ties broken by id."""
    scores = np.asarray(scores, dtype=np.float64)
    valid = np.nonzero(np.isfinite(scores))[0]
    if valid.size == 0 or k <= 0:
        return valid[:0]
    keys = score_keys(scores[valid])
    if valid.size > k:
        threshold = keys[np.argpartition(-keys, k - 1)[:k]].min()
        keep = keys >= threshold  # every tie at the boundary, then the order decides
        valid, keys = valid[keep], keys[keep]
    return valid[np.lexsort((valid, -keys))][:k]


def unit_rows(matrix: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (zero rows stay zero), float32."""
    matrix = np.asarray(matrix, dtype=np.float32)
    return matrix / np.maximum(np.linalg.norm(matrix, axis=1, keepdims=True), 1e-12)


def cosine(matrix: np.ndarray, query: np.ndarray) -> np.ndarray:
    """Cosine of each row of ``matrix`` to ``query`` (a zero row scores 0)."""
    q = np.asarray(query, dtype=np.float64).reshape(-1)
    m = np.asarray(matrix, dtype=np.float64)
    norms = np.maximum(np.linalg.norm(m, axis=1), 1e-12)
    return (m @ q) / norms / max(float(np.linalg.norm(q)), 1e-12)


def rank_candidates(experts: Sequence[Expert], query: np.ndarray, k: int) -> list[Candidate]:
    """Exact cosine of each expert's embedding to ``query``, best first, ties by id, at most ``k``.

    Experts without an embedding of the query's dimension are skipped.
    """
    pool = sorted((e for e in experts if e.embedding and len(e.embedding) == query.size), key=lambda e: e.id)
    if not pool:
        return []
    scores = cosine(np.asarray([e.embedding for e in pool], dtype=np.float64), query)
    return [Candidate(pool[i], float(scores[i])) for i in top_k(scores, k)]


def top_k_similar(
    ids: Sequence[str], families: Sequence[str | None], matrix: np.ndarray, k: int
) -> list[tuple[str, str, float]]:
    """SIMILAR_TO: ``(src, dst, score)`` for each expert's ``k`` most similar experts of its own family.

    Cosine over float32 unit rows (what both backends store), rounded to ``SCORE_DECIMALS`` — the score
    written on the edge — with ties broken by id; never an expert to itself. ``ids`` must be sorted.
    Edges come grouped by family (sorted), then by source id, best first.
    """
    if k <= 0 or not len(ids):
        return []
    id_array = np.asarray(ids, dtype=object)
    unit = unit_rows(np.asarray(matrix).reshape(len(ids), -1))
    fam = np.asarray([f or "" for f in families], dtype=object)
    scale = np.float32(10**SCORE_DECIMALS)
    out: list[tuple[str, str, float]] = []
    for family in sorted(set(fam.tolist())):
        rows = np.nonzero(fam == family)[0]
        n = len(rows)
        kk = min(k, n - 1)
        if kk <= 0:
            continue
        sub = unit[rows]
        step = max(1, min(1024, _SIMILAR_BLOCK_CELLS // n))
        for start in range(0, n, step):
            block = sub[start : start + step] @ sub.T
            np.multiply(block, scale, out=block)
            np.rint(block, out=block)  # whole units of 1e-6, exact in float32
            local = np.arange(block.shape[0])
            block[local, start + local] = -np.inf  # not similar to itself
            part = np.argpartition(block, n - kk, axis=1)[:, n - kk :]
            vals = np.take_along_axis(block, part, axis=1)
            # a tie straddling the k-th place: the partial sort may have kept a larger id; redo such rows
            threshold = vals.min(axis=1)
            for r in np.nonzero((block >= threshold[:, None]).sum(axis=1) > kk)[0]:
                tied = np.nonzero(block[r] >= threshold[r])[0]
                part[r] = tied[np.lexsort((tied, -block[r, tied]))][:kk]
                vals[r] = block[r, part[r]]
            order = np.lexsort((part, -vals), axis=-1)  # best first, ties by id (rows are id-sorted)
            part = np.take_along_axis(part, order, axis=1)
            scores = np.round(
                np.take_along_axis(vals, order, axis=1).astype(np.float64) / 10**SCORE_DECIMALS, 6
            )
            src = np.repeat(id_array[rows[start : start + block.shape[0]]], kk)
            out.extend(
                zip(src.tolist(), id_array[rows[part.ravel()]].tolist(), scores.ravel().tolist(), strict=True)
            )
    return out


# ------------------------------------------------------------------------------------ subgraph assembly


def expert_node(
    expert_id: str, kind: ExpertKind | str, name: str, family: str, popularity: float | None
) -> SubgraphNode:
    """The activation node of an expert (every adapter kind is a ``lora`` node)."""
    return SubgraphNode(
        expert_id,
        "checkpoint" if ExpertKind(kind) is ExpertKind.checkpoint else "lora",
        text=name or "",
        family=family or "",
        popularity=float(popularity or 0.0),
    )


def expert_node_of(expert: Expert) -> SubgraphNode:
    return expert_node(expert.id, expert.kind, expert.name, expert.base_family, expert.popularity)


def neighbour_ids(selected: Sequence[str], similar: Iterable[tuple[str, str, float]]) -> list[str]:
    """The SIMILAR_TO neighbours of an activation that are not selected themselves, sorted by id."""
    return sorted({x for src, dst, _ in similar for x in (src, dst)} - set(selected))


def vector_rows(vectors: Sequence[Sequence[float] | np.ndarray | None], dim: int) -> np.ndarray:
    """One float32 row per vector; a missing vector (or one of another dimension) is a zero row."""
    out = np.zeros((len(vectors), dim), dtype=np.float32)
    for i, v in enumerate(vectors):
        if v is not None and len(v) == dim:
            out[i] = np.asarray(v, dtype=np.float32)
    return out


def assemble_subgraph(
    experts: Sequence[tuple[SubgraphNode, Sequence[float] | np.ndarray | None]],
    similar: Iterable[tuple[str, str, float]],
    capabilities: Iterable[tuple[str, str, float, Mapping[str, float]]],
    prompts: Mapping[str, tuple[SubgraphNode, Sequence[float] | np.ndarray | None]],
    dim: int,
) -> Subgraph:
    """The activated subgraph from its rows.

    Nodes: ``experts`` (selected, then neighbours) in the given order, then the reference prompts that a
    capability names, by id. Edges: SIMILAR_TO by (src, dst), then CAPABILITY by (expert, prompt), each
    once, scores at ``SCORE_DECIMALS``. Embeddings: one row per node, zero where a node has none.
    ``capabilities`` rows are ``(expert_id, prompt_id, score, metrics)``; ``prompts`` maps each prompt id
    to its node and embedding.
    """
    nodes = [node for node, _ in experts]
    vectors = [vector for _, vector in experts]
    edges: dict[tuple[str, str, str], SubgraphEdge] = {}
    for src, dst, score in sorted(similar, key=lambda r: (r[0], r[1])):
        edges[(src, dst, "SIMILAR_TO")] = SubgraphEdge(src, dst, "SIMILAR_TO", rounded_score(score))
    prompt_ids: set[str] = set()
    for expert_id, prompt_id, score, metrics in sorted(capabilities, key=lambda r: (r[0], r[1])):
        prompt_ids.add(prompt_id)
        edges[(expert_id, prompt_id, "CAPABILITY")] = SubgraphEdge(
            expert_id, prompt_id, "CAPABILITY", rounded_score(score), dict(metrics)
        )
    for prompt_id in sorted(prompt_ids):
        node, vector = prompts[prompt_id]
        nodes.append(node)
        vectors.append(vector)
    return Subgraph(nodes=nodes, edges=list(edges.values()), embeddings=vector_rows(vectors, dim))


def attach_prompt(sub: Subgraph, prompt_embedding: Sequence[float] | np.ndarray | None, dim: int) -> Subgraph:
    """The subgraph with the user prompt linked to its nearest reference prompts (when one is given)."""
    if prompt_embedding is None:
        return sub
    vector = check_vector("prompt", prompt_embedding)
    check_query_dimension("prompt", vector, dim)
    return sub.with_prompt("", vector)
