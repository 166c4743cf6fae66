"""The Expert Selection Agent: parse -> retrieve -> review -> coefficients, producing a ``MergePlan``.

Each stage is timed (``MergePlan.timings``, seconds; ``subgraph`` and ``vgae`` are parts of
``coefficients``) and explains itself in ``MergePlan.notes`` and in each
planned expert's ``reason``. The store is passed in; the caller owns its lifetime (``planner.make_plan``
opens it for the length of one call).
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import numpy as np
import torch

from core.embeddings import Embedder, get_embedder
from core.prompt_syntax import network_tags
from core.settings import Settings
from core.types import DiffGraphError, MergePlan, PlannedExpert
from graphdb.search import SearchCorpus, model_key
from graphdb.store import Candidate, CandidateFilter, GraphStore
from graphdb.subgraph import FAMILIES, NODE_TYPES
from planner.coefficients import (
    SIMILARITY_FALLBACK_NOTE,
    BetaEstimate,
    check_method,
    method_values,
    normalise_checkpoints,
    planned,
    predict_beta,
)
from planner.parse import parse_prompt
from planner.retrieval import Query, candidate_filter, choose_family, rank_experts, validate_prompt
from planner.review import Choice, Selection, review
from planner.vgae_checkpoints import PlannerCheckpoint, latest_checkpoint

if TYPE_CHECKING:
    from core.llm import LLMClient

log = logging.getLogger(__name__)

RETRIEVE_FACTOR = 4  # candidates retrieved per slot the reviewer may fill
MIN_RETRIEVE = 8


class ExpertSelectionAgent:
    """Plans merges against one open ``GraphStore``.

    Args:
        settings: limits (``k_ckpt``, ``k_lora``, ``lora_max_weight``), filters and the base models.
        store: an open graph store (not closed here).
        embedder: defaults to ``core.embeddings.get_embedder(settings)``.
        llm: an ``LLMClient`` for parsing and review; ``None`` means the offline parser and MMR reviewer.
        checkpoint: a trained VGAE; by default the latest registered one, loaded on first use.
    """

    def __init__(
        self,
        settings: Settings,
        store: GraphStore,
        embedder: Embedder | None = None,
        llm: LLMClient | None = None,
        checkpoint: PlannerCheckpoint | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.embedder = embedder or get_embedder(settings)
        self.llm = llm
        self._checkpoint = checkpoint

    def _vgae(self) -> PlannerCheckpoint | None:
        if self._checkpoint is None:
            self._checkpoint = latest_checkpoint(self.settings)
        return self._checkpoint

    def plan(self, prompt: str, method: str = "vgae", seed: int = 0) -> MergePlan:
        """A ``MergePlan`` for ``prompt``.

        Raises:
            ValidationFailed: empty or over-long prompt, unknown method.
            DiffGraphError: the graph has no experts.
        """
        prompt = validate_prompt(prompt)
        check_method(method)
        torch.manual_seed(seed)
        timings: dict[str, float] = {}
        notes: list[str] = []

        with _timed(timings, "parse"):
            req, parser = parse_prompt(prompt, self.llm)
        notes.append(f"requirements: {parser} parser")

        with _timed(timings, "embed"):
            query = Query.build(self.embedder, prompt, req)
        with _timed(timings, "retrieve"):
            filters = candidate_filter(self.settings)
            family, why = choose_family(self.store, query, self.settings, req.base_family_hint, filters)
            notes.append(why)
            s = self.settings
            ckpts, loras = [], []
            if method != "direct":
                ckpts = self._retrieve(query, "checkpoint", family, s.k_ckpt, filters)
                loras = self._retrieve(query, "lora", family, s.k_lora, filters)
            # Only when nothing came back is it worth asking (a full scan on the embedded store).
            if not ckpts and not loras and not self.store.find_experts(limit=1):
                raise DiffGraphError("the expert graph is empty: crawl or register experts before planning")

        used = {"method": method}  # what actually made the coefficients (vgae may fall back)

        def finish(
            checkpoints: list[PlannedExpert] | None = None, loras: list[PlannedExpert] | None = None
        ) -> MergePlan:
            return MergePlan(
                prompt=prompt,
                base_family=family,
                base_model=s.base_models.get(family, ""),
                coefficients=used["method"],
                seed=seed,
                checkpoints=checkpoints or [],
                loras=loras or [],
                notes=notes,
                timings=timings,
            )

        if method == "direct":
            notes.append("direct: base model only, no experts")
            return finish()

        with _timed(timings, "review"):
            highlights = self._highlights([c.expert.id for c in (*ckpts, *loras)]) if self.llm else None
            selection = review(prompt, req, ckpts, loras, s.k_ckpt, s.k_lora, self.llm, highlights)
        notes.append(f"review: {'LLM' if selection.source == 'llm' else 'offline threshold + MMR'}")
        selection = _explained(selection, query)
        forced = self._prompt_tags(prompt, family, notes)
        if not selection.checkpoints and not selection.loras:
            if not forced:
                notes.append(f"no expert in family {family} matched the prompt well enough: base model only")
                return finish()
            return finish([], forced)

        with _timed(timings, "coefficients"):
            planned_ck, planned_lo, used["method"] = self._assign(selection, method, prompt, query, notes, timings)
        return finish(planned_ck, with_forced(planned_lo, forced, s.k_lora, self.store.search_corpus()))

    def _prompt_tags(self, prompt: str, family: str, notes: list[str]) -> list[PlannedExpert]:
        """LoRAs the prompt selects itself with ``<lora:name:weight>``: a tag naming a known adapter (weight
        file name, then model name, then id) is planned at that weight, clamped to ``[0, lora_max_weight]``
        (1.0 when the tag has none), with reason ``prompt_tag``; anything else becomes a note."""
        tags = [t for t in network_tags(prompt) if t.kind in ("lora", "lyco")]
        if not tags:
            return []
        corpus = self.store.search_corpus()
        lmax = self.settings.lora_max_weight
        out: dict[str, PlannedExpert] = {}
        for tag in tags:
            row = corpus.find(tag.name)
            expert = corpus.experts[row] if row is not None else None
            if expert is None or not expert.kind.is_adapter:
                notes.append(f"prompt tag <{tag.kind}:{tag.name}>: no known LoRA of that name, ignored")
                continue
            if expert.base_family != family:
                notes.append(
                    f"prompt tag <{tag.kind}:{tag.name}>: {expert.id} is for {expert.base_family}, "
                    f"the plan is for {family}: ignored"
                )
                continue
            weight = min(max(1.0 if tag.weight is None else tag.weight, 0.0), lmax)
            out[expert.id] = PlannedExpert(
                expert_id=expert.id,
                name=expert.name,
                kind=expert.kind,
                coefficient=round(weight, 6),
                reason=f"prompt_tag: <{tag.kind}:{tag.name}> selects it at weight {weight:g}",
                sha256=expert.primary_file.sha256 if expert.primary_file else None,
            )
        if out:
            notes.append(f"prompt tags: {len(out)} LoRA(s) selected by <lora:…> tags")
        return list(out.values())

    def _retrieve(
        self, query: Query, kind: str, family: str, limit: int, filters: CandidateFilter
    ) -> list[Candidate]:
        if limit <= 0:
            return []
        k = max(MIN_RETRIEVE, RETRIEVE_FACTOR * limit)
        return rank_experts(self.store, query, kind, family, k, filters)

    def _assign(
        self,
        sel: Selection,
        method: str,
        prompt: str,
        query: Query,
        notes: list[str],
        timings: dict[str, float],
    ) -> tuple[list[PlannedExpert], list[PlannedExpert], str]:
        """Planned checkpoints and LoRAs, and the method that actually produced the coefficients."""
        lmax = self.settings.lora_max_weight
        prompt_vec = query.prompt_vec
        betas = None
        if method == "vgae":
            betas = self._vgae_betas(sel, prompt, query, notes, timings)
        if betas is not None:
            ck_values = [betas[c.candidate.expert.id].mean for c in sel.checkpoints]
            # LoRA Beta means sum to 1 like fixed's 1/n and similarity's softmax (comparable strengths)
            lo_values = normalise_checkpoints([betas[c.candidate.expert.id].mean for c in sel.loras])
            used = method
        else:
            used = "similarity" if method == "vgae" else method
            ck_values = method_values(used, sel.checkpoints, prompt_vec)
            lo_values = method_values(used, sel.loras, prompt_vec)
        return (
            # a VGAE trained on merged outcomes predicts each checkpoint's task-vector scale; one trained on solo
            # capability predicts how good each expert is, which only says how to share (planner.coefficients)
            planned(sel.checkpoints, "checkpoint", ck_values, lmax, betas, absolute=self._scales(betas)),
            planned(sel.loras, "lora", lo_values, lmax, betas),
            used,
        )

    def _scales(self, betas: dict[str, BetaEstimate] | None) -> bool:
        ckpt = self._vgae() if betas is not None else None
        return ckpt is not None and ckpt.target == "merged"

    def _vgae_betas(
        self, sel: Selection, prompt: str, query: Query, notes: list[str], timings: dict[str, float]
    ) -> dict[str, BetaEstimate] | None:
        prompt_vec = query.prompt_vec
        ckpt = self._vgae()
        if ckpt is None:
            notes.append(SIMILARITY_FALLBACK_NOTE)
            return None
        if ckpt.config.in_dim != len(prompt_vec) + _EXTRA_FEATURES:
            notes.append(
                f"fallback: VGAE {ckpt.version} expects {ckpt.config.in_dim - _EXTRA_FEATURES}-dim embeddings, the embedder "
                f"gives {len(prompt_vec)}: falling back to the similarity rule; retrain the planner"
            )
            return None
        ids = [c.candidate.expert.id for c in (*sel.checkpoints, *sel.loras)]
        with _timed(timings, "subgraph"):
            sub = self.store.activate_subgraph(ids)
        with _timed(timings, "vgae"):
            chosen = [c.candidate.expert for c in (*sel.checkpoints, *sel.loras)]
            features = {e.id: query.pair_features(e) for e in chosen} if ckpt.config.pair_dim else None
            betas = predict_beta(ckpt.model, sub, prompt, prompt_vec, ids, features)
        if len(betas) != len(ids):
            notes.append("fallback: VGAE could not score every expert: falling back to the similarity rule")
            return None
        notes.append(f"coefficients: VGAE {ckpt.version} (Beta mean; std = uncertainty)")
        return betas

    def _highlights(self, expert_ids: list[str]) -> dict[str, list[str]]:
        """Per expert, its three best reference-prompt categories by mean capability score."""
        if not expert_ids:
            return {}
        category = {p.id: p.category for p in self.store.list_ref_prompts()}
        out: dict[str, list[str]] = {}
        for eid in expert_ids:
            by_cat: dict[str, list[float]] = defaultdict(list)
            for cap in self.store.get_capabilities(expert_id=eid):
                by_cat[category.get(cap.prompt_id, "other")].append(cap.score)
            means = sorted(((float(np.mean(v)), c) for c, v in by_cat.items()), reverse=True)[:3]
            out[eid] = [f"{c}: {m:.2f}" for m, c in means]
        return out


def with_forced(
    planned_lo: list[PlannedExpert], forced: list[PlannedExpert], k_lora: int, corpus: SearchCorpus
) -> list[PlannedExpert]:
    """The prompt-tag LoRAs first, then the planned ones of other models, ``k_lora`` in all (at least the
    forced ones: the user named them)."""
    if not forced:
        return planned_lo

    def key(expert_id: str) -> str:
        row = corpus.find(expert_id)
        return model_key(corpus.experts[row]) if row is not None else expert_id

    taken = {key(p.expert_id) for p in forced}
    rest = [p for p in planned_lo if key(p.expert_id) not in taken]
    return [*forced, *rest[: max(0, k_lora - len(forced))]]


# node features = [embedding | node-type one-hot | family one-hot | popularity] (graphdb.subgraph)
_EXTRA_FEATURES = len(NODE_TYPES) + len(FAMILIES) + 1


def _explained(selection: Selection, query: Query) -> Selection:
    """Append the retrieval evidence to each choice's reason."""

    def one(choices: list[Choice]) -> list[Choice]:
        out = []
        for c in choices:
            why = query.explain(c.candidate.expert)
            out.append(Choice(c.candidate, f"{c.reason}; {why}" if why else c.reason))
        return out

    return Selection(one(selection.checkpoints), one(selection.loras), selection.source)


@contextmanager
def _timed(timings: dict[str, float], stage: str) -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[stage] = round(timings.get(stage, 0.0) + time.perf_counter() - start, 6)


__all__ = ["ExpertSelectionAgent"]
