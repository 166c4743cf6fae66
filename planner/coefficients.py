"""Merge coefficients for the experts the reviewer chose, by method name.

* ``direct``: the base model only, no experts (ablation baseline).
* ``fixed``: uniform over the chosen experts (ablation baseline).
* ``similarity``: softmax of the cosine between the prompt and each expert's skill embedding, with
  temperature ``SIMILARITY_TEMPERATURE``. This is also the documented fallback of ``vgae`` when no trained
  VGAE exists (or it cannot be used); the plan's notes then say so.
* ``vgae``: the Beta mean predicted by the trained VGAE for (expert, user-prompt node) on the activated
  subgraph; the Beta alpha/beta/mean/std are reported on each planned expert.

Each method yields a value ``v_i`` in ``[0, 1]`` per expert. Checkpoint coefficients (task-arithmetic
scales: the merge is ``θ_base + Σ c_i τ_i``) are, for ``fixed`` and ``similarity``, the ``v_i`` normalised to
sum to 1 (uniform if all are 0), and so for a ``vgae`` trained on solo capability (its Beta means say how
good each expert is, not how much of it to add); for a ``vgae`` trained on merged outcomes (``planner train
--target merged``) the Beta means themselves, as the paper reads them: how much of each expert's task vector
to add, learned from merges that were sampled and scored. Summing to 1 halves each of two experts' task
vectors — on ``world:compositional-dev`` ``fixed`` at full strength (``c_i`` = 1) scored 0.637 against
0.601, on ``world:dev`` (one speciality per prompt) 0.626 against 0.637 — so the right scale depends on the
prompt (and, on real models, on how much the experts' task vectors interfere): the merged search measures it.

LoRA strengths are ``lora_max_weight * v_i`` where the LoRA values sum to 1 for every method (``fixed``:
1/n, ``similarity``: a softmax, ``vgae``: the Beta means divided by their sum), so strengths are comparable
across methods; each strength is then capped at the LoRA's recommended weight when its source gives one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from core.types import ExpertKind, PlannedExpert, ValidationFailed
from graphdb.subgraph import PROMPT_NODE_ID, Subgraph
from planner.graph import REF_KNN, link_ref_prompts, to_tensors
from planner.retrieval import unit_embedding
from planner.review import Choice
from planner.vgae import BetaVGAE

METHODS = ("vgae", "fixed", "similarity", "direct")
SIMILARITY_TEMPERATURE = 0.1
SIMILARITY_FALLBACK_NOTE = (
    "fallback: no trained VGAE model: coefficients use the similarity rule (softmax of prompt-skill cosine, "
    f"temperature {SIMILARITY_TEMPERATURE}); run `diffgraph planner train` to enable vgae"
)


@dataclass(frozen=True)
class BetaEstimate:
    alpha: float
    beta: float

    @property
    def mean(self) -> float:
        return self.alpha / (self.alpha + self.beta)

    @property
    def std(self) -> float:
        t = self.alpha + self.beta
        return float(np.sqrt(self.alpha * self.beta / (t * t * (t + 1.0))))


def check_method(method: str) -> str:
    if method not in METHODS:
        raise ValidationFailed(f"unknown planner method {method!r}: use one of {', '.join(METHODS)}")
    return method


def normalise_checkpoints(values: Sequence[float]) -> list[float]:
    """Non-negative weights summing to 1 (uniform when all are 0)."""
    v = np.clip(np.asarray(values, dtype=np.float64), 0.0, None)
    if not len(v):
        return []
    total = float(v.sum())
    return [float(x) for x in (v / total if total > 0 else np.full(len(v), 1.0 / len(v)))]


def checkpoint_coefficients(values: Sequence[float], absolute: bool = False) -> list[float]:
    """The checkpoints' task-arithmetic scales: ``values`` clipped into ``[0, 1]`` when ``absolute`` (``vgae``),
    else normalised to sum 1."""
    if absolute:
        return [float(min(max(v, 0.0), 1.0)) for v in values]
    return normalise_checkpoints(values)


def scale_loras(
    values: Sequence[float], lora_max_weight: float, caps: Sequence[float | None] | None = None
) -> list[float]:
    """Strengths ``lora_max_weight * v`` with ``v`` clipped into ``[0, 1]``, each at most its cap (a LoRA's
    recommended weight; ``None`` = no cap)."""
    caps = caps if caps is not None else [None] * len(values)
    out = []
    for v, cap in zip(values, caps, strict=True):
        s = lora_max_weight * min(max(v, 0.0), 1.0)
        out.append(float(min(s, cap) if cap is not None and cap > 0 else s))
    return out


def softmax(values: Sequence[float], temperature: float = SIMILARITY_TEMPERATURE) -> list[float]:
    if not len(values):
        return []
    z = np.asarray(values, dtype=np.float64) / temperature
    e = np.exp(z - z.max())
    return [float(x) for x in e / e.sum()]


def cosine_to_prompt(choices: Sequence[Choice], prompt_vec: np.ndarray) -> list[float]:
    """Cosine of each chosen expert's skill embedding to the prompt (its retrieval score if it has none)."""
    out = []
    for ch in choices:
        v = unit_embedding(ch.candidate.expert, len(prompt_vec))
        out.append(float(ch.candidate.score) if v is None else float(v @ prompt_vec))
    return out


@torch.no_grad()
def predict_beta(
    model: BetaVGAE,
    sub: Subgraph,
    prompt: str,
    prompt_vec: np.ndarray,
    expert_ids: Sequence[str],
    features: dict[str, Sequence[float]] | None = None,
) -> dict[str, BetaEstimate]:
    """Beta parameters of each expert in ``expert_ids`` for the user prompt, on the activated subgraph.

    ``features`` maps an expert id to its pair evidence with the prompt (``Query.pair_features``); a model
    whose decoder reads it scores only the experts that have it."""
    graph = to_tensors(link_ref_prompts(sub).with_prompt(prompt, prompt_vec, k=REF_KNN))
    index = graph.index
    needs = model.decoder.pair_dim > 0
    ids = [e for e in expert_ids if e in index and (not needs or e in (features or {}))]
    if not ids:
        return {}
    model.eval()
    latent = model.encode(graph.x, graph.edge_index, graph.edge_weight)
    p = index[PROMPT_NODE_ID]
    pairs = torch.tensor([[index[e] for e in ids], [p] * len(ids)], dtype=torch.long)
    f = torch.tensor([list(features[e]) for e in ids], dtype=torch.float32) if needs and features else None
    params = model.decode(latent.mu, pairs, f)
    return {
        e: BetaEstimate(float(a), float(b)) for e, a, b in zip(ids, params.alpha, params.beta, strict=True)
    }


def planned(
    choices: Sequence[Choice],
    kind_group: str,
    values: Sequence[float],
    lora_max_weight: float,
    betas: dict[str, BetaEstimate] | None = None,
    absolute: bool = False,
) -> list[PlannedExpert]:
    """``PlannedExpert`` rows for one kind group (``"checkpoint"`` or ``"lora"``) from per-expert values
    (checkpoint values taken as absolute scales when ``absolute``: see :func:`checkpoint_coefficients`)."""
    if kind_group == "checkpoint":
        coeffs = checkpoint_coefficients(values, absolute)
    else:
        caps = [ch.candidate.expert.recommended_weight for ch in choices]
        coeffs = scale_loras(values, lora_max_weight, caps)
    out = []
    for ch, c in zip(choices, coeffs, strict=True):
        e = ch.candidate.expert
        b = (betas or {}).get(e.id)
        out.append(
            PlannedExpert(
                expert_id=e.id,
                name=e.name,
                kind=ExpertKind(e.kind),
                coefficient=round(c, 6),
                alpha=round(b.alpha, 6) if b else None,
                beta=round(b.beta, 6) if b else None,
                mean=round(b.mean, 6) if b else None,
                std=round(b.std, 6) if b else None,
                reason=ch.reason,
                sha256=e.primary_file.sha256 if e.primary_file else None,
                # added to the sampled prompt (merger.sampling); shown in ``plan --json``
                trigger_words=[w[:100] for w in e.trained_words[:8]] if kind_group != "checkpoint" else [],
            )
        )
    return out


def method_values(method: str, choices: Sequence[Choice], prompt_vec: np.ndarray) -> list[float]:
    """Per-expert values in ``[0, 1]`` for the rule-based methods (``fixed``, ``similarity``)."""
    if method == "fixed":
        return [1.0 / len(choices)] * len(choices) if choices else []
    if method == "similarity":
        return softmax(cosine_to_prompt(choices, prompt_vec))
    raise ValidationFailed(f"method {method!r} has no rule-based values")
