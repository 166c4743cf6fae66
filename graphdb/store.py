"""The ``GraphStore`` contract: domain operations on the expert graph, not a Cypher passthrough.

Schema (Neo4j labels; the embedded backend mirrors it with tables):

* ``(:Expert:Checkpoint)`` / ``(:Expert:LoRA)`` keyed by ``id`` (``<source>:<version id>``)
* ``(:BaseModel {name})``, ``(:Tag {name})``, ``(:Creator {name})``
* ``(:RefPrompt {id, category, text, set_version})``, ``(:Generation {id, prompt, created_at})``
* ``(:Expert)-[:BASED_ON]->(:BaseModel)``, ``-[:TAGGED]->(:Tag)``, ``-[:CREATED_BY]->(:Creator)``
* ``(:Expert)-[:CAPABILITY {score, <metric>_gain..., n_images, calibrated_at, ref_set_version}]->(:RefPrompt)``
* ``(:Expert)-[:SIMILAR_TO {score}]->(:Expert)``
* ``(:Generation)-[:USED {coefficient}]->(:Expert)``

``BaseModel`` nodes are named by *family* (``sd15``, ``sdxl``, ``flux``...); the raw source string stays on
the expert (``base_model``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np

from core.types import Capability, Expert, ExpertKind, NotFoundError, RefPrompt
from graphdb.errors import GraphBusy as GraphBusy  # re-exported: the errors' old home
from graphdb.errors import GraphError as GraphError
from graphdb.errors import GraphUnavailable as GraphUnavailable

if TYPE_CHECKING:
    from graphdb.search import SearchCorpus
    from graphdb.subgraph import Subgraph

NODE_LABELS = ("Expert", "Checkpoint", "LoRA", "Embedding", "BaseModel", "Tag", "Creator", "RefPrompt", "Generation")
REL_TYPES = ("BASED_ON", "TAGGED", "CREATED_BY", "CAPABILITY", "SIMILAR_TO", "USED")


ExpertNotFound = NotFoundError


@dataclass(frozen=True)
class ExpertFilter:
    """Filters for ``find_experts`` (all optional, combined with AND)."""

    kind: ExpertKind | None = None
    base_family: str | None = None
    source: str | None = None
    tag: str | None = None
    creator: str | None = None
    uncalibrated_for: str | None = None  # ref set version: experts not calibrated against it
    name_contains: str | None = None


@dataclass(frozen=True)
class CandidateFilter:
    """Safety and licence filters applied during candidate retrieval."""

    allow_nsfw: bool = False
    require_commercial_use: bool = False
    require_derivatives: bool = False
    exclude_ids: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Candidate:
    expert: Expert
    score: float  # cosine similarity in [-1, 1]


@dataclass(frozen=True)
class UpsertResult:
    created: int = 0
    updated: int = 0
    unchanged: int = 0
    created_ids: tuple[str, ...] = ()
    updated_ids: tuple[str, ...] = ()


@dataclass
class GraphStats:
    nodes: dict[str, int] = field(default_factory=dict)
    relationships: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> dict[str, dict[str, int]]:
        return {"nodes": dict(self.nodes), "relationships": dict(self.relationships)}


@runtime_checkable
class GraphStore(Protocol):
    """What every backend provides. Methods raise ``GraphError`` (or ``NotFoundError``) on bad input."""

    def ensure_schema(self) -> None:
        """Create constraints/indexes/tables; idempotent."""

    def close(self) -> None: ...

    def upsert_experts(self, experts: Sequence[Expert]) -> UpsertResult:
        """Create or update experts with their BASED_ON/TAGGED/CREATED_BY links; idempotent on ``id``.

        An expert whose ``content_hash`` is unchanged counts as ``unchanged``. Links are replaced, never
        duplicated. Calibration fields already stored are kept unless the new record sets them.
        """

    def get_expert(self, expert_id: str) -> Expert:
        """Raises ``NotFoundError`` naming the id."""

    def find_experts(self, filters: ExpertFilter | None = None, limit: int = 1000) -> list[Expert]: ...

    def delete_expert(self, expert_id: str) -> None:
        """Remove the expert and all its relationships. Raises ``NotFoundError``."""

    def upsert_ref_prompts(self, prompts: Sequence[RefPrompt]) -> int: ...

    def list_ref_prompts(self, set_version: str | None = None) -> list[RefPrompt]: ...

    def write_capabilities(self, capabilities: Sequence[Capability]) -> int:
        """Idempotent: one CAPABILITY edge per (expert, prompt); the last calibration wins.

        Unknown expert or prompt ids raise ``NotFoundError`` and nothing of the batch is written.
        """

    def get_capabilities(
        self, expert_id: str | None = None, prompt_id: str | None = None
    ) -> list[Capability]: ...

    def mark_calibrated(
        self, expert_id: str, ref_set_version: str, scorer_version: str, calibrated_at: datetime
    ) -> None: ...

    def link_similar(self, k: int = 5) -> int:
        """Recompute SIMILAR_TO: each expert to its ``k`` most similar experts of the same family."""

    def candidates(
        self,
        embedding: Sequence[float] | np.ndarray,
        kind: ExpertKind | str | None = None,
        base_family: str | None = None,
        k: int = 20,
        filters: CandidateFilter | None = None,
    ) -> list[Candidate]:
        """Top-``k`` experts by cosine similarity of their skill embedding, best first.

        ``kind="lora"`` matches every adapter kind (lora, locon, loha, lokr).
        """

    def search_corpus(self) -> SearchCorpus:
        """Every expert in process memory with a dense matrix and a BM25 index (``graphdb.search``),
        cached until the next write."""
        ...

    def activate_subgraph(
        self, expert_ids: Sequence[str], prompt_embedding: Sequence[float] | np.ndarray | None = None
    ) -> Subgraph:
        """The selected experts, their CAPABILITY edges and reference prompts, and SIMILAR_TO neighbours."""

    def record_generation(
        self,
        generation_id: str,
        prompt: str,
        used: Sequence[tuple[str, float]],
        created_at: datetime | None = None,
    ) -> None:
        """Create (idempotently, keyed by id) a :Generation linked to each used expert with its coefficient."""

    def stats(self) -> GraphStats: ...


def __getattr__(name: str) -> object:
    """``open_store``/``store_session`` moved to ``graphdb.backends`` (the contract does not know its
    implementations); the old import path keeps working."""
    if name in {"open_store", "store_session"}:
        from graphdb import backends

        return getattr(backends, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
