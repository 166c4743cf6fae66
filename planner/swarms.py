"""Model Swarms (Feng et al., 2024, arXiv:2410.11163) as a budgeted search over merge coefficients.

Model Swarms moves a swarm of "particles" (there: whole expert models; here: merge-coefficient vectors
``x`` in ``[0, 1]^d``, one value per expert) by particle-swarm optimisation of a utility measured on a few
prompts. Each step, particle ``i`` with velocity ``v_i``, personal best ``p_i``, global best ``g`` and
global worst ``g_w`` moves by

.. math::
    v_i \\leftarrow \\phi_v v_i + \\phi_p r_p (p_i - x_i) + \\phi_g r_g (g - x_i) - \\phi_w r_w (g_w - x_i),
    \\qquad x_i \\leftarrow \\operatorname{clip}_{[0,1]}(x_i + \\lambda v_i),

with ``r`` uniform in ``[0, 1]`` and the step size ``λ`` decaying by ``step_decay`` each round (the
paper's inertia / cognitive / social / repel-from-worst terms). The swarm starts from the uniform vector
(the ``fixed`` merge), one particle leaning on each expert (the paper starts from the experts themselves)
and random vectors. ``budget`` is the number of distinct utility evaluations (each one merge + sampling +
scoring); positions are snapped to a ``GRID`` so a revisited point costs nothing and hits the merge cache.

A vector becomes a merge the way the planner turns values into coefficients
(:func:`planner.coefficients.checkpoint_coefficients` / ``scale_loras``), so coefficients found here are
directly comparable with — and a training target for — the VGAE's Beta means.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from core.types import MergePlan, PlannedExpert
from planner.coefficients import checkpoint_coefficients, normalise_checkpoints, scale_loras

if TYPE_CHECKING:
    from PIL.Image import Image

    from core.settings import Settings

GRID = 0.05


@dataclass(frozen=True)
class SwarmConfig:
    budget: int = 12  # distinct utility evaluations
    particles: int = 4
    inertia: float = 0.4  # phi_v
    personal: float = 0.3  # phi_p
    social: float = 0.4  # phi_g
    repel: float = 0.1  # phi_w
    step: float = 0.8  # lambda
    step_decay: float = 0.8
    seed: int = 0


@dataclass
class SwarmResult:
    best: np.ndarray
    best_utility: float
    evaluations: list[tuple[tuple[float, ...], float]] = field(default_factory=list)


def _snap(x: np.ndarray) -> tuple[float, ...]:
    return tuple(float(v) for v in np.clip(np.round(x / GRID) * GRID, 0.0, 1.0).round(4))


def swarm_search(dim: int, utility: Callable[[np.ndarray], float], config: SwarmConfig = SwarmConfig()
                 ) -> SwarmResult:
    """Maximise ``utility`` over ``[0, 1]^dim`` with at most ``config.budget`` distinct evaluations."""
    if dim < 1:
        raise ValueError("swarm search needs at least one expert")
    rng = np.random.default_rng(config.seed)
    seen: dict[tuple[float, ...], float] = {}
    order: list[tuple[tuple[float, ...], float]] = []

    def evaluate(x: np.ndarray) -> float | None:
        key = _snap(x)
        if key not in seen:
            if len(seen) >= config.budget:
                return None
            seen[key] = float(utility(np.asarray(key)))
            order.append((key, seen[key]))
        return seen[key]

    starts = [np.ones(dim)] + [np.where(np.arange(dim) == i, 1.0, 0.2) for i in range(dim)]
    n = max(1, config.particles)
    while len(starts) < n:
        starts.append(rng.uniform(0.0, 1.0, dim))
    pos = [np.asarray(s, dtype=np.float64) for s in starts[:n]]
    vel = [np.zeros(dim) for _ in pos]
    best_pos = [p.copy() for p in pos]
    best_val = [-np.inf] * n
    step = config.step
    while len(seen) < config.budget:
        progressed = False
        for i, p in enumerate(pos):
            u = evaluate(p)
            if u is None:
                break
            progressed = True
            if u > best_val[i]:
                best_val[i], best_pos[i] = u, np.asarray(_snap(p))
        if not progressed or len(seen) >= config.budget:
            break
        g = np.asarray(max(order, key=lambda kv: kv[1])[0])
        gw = np.asarray(min(order, key=lambda kv: kv[1])[0])
        for i in range(n):
            r = rng.uniform(0.0, 1.0, (3, dim))
            vel[i] = (config.inertia * vel[i] + config.personal * r[0] * (best_pos[i] - pos[i])
                      + config.social * r[1] * (g - pos[i]) - config.repel * r[2] * (gw - pos[i]))
            pos[i] = np.clip(pos[i] + step * vel[i], 0.0, 1.0)
            if _snap(pos[i]) in seen:  # a stalled particle explores instead of re-reading its memo
                pos[i] = np.clip(pos[i] + rng.normal(0.0, 0.15, dim), 0.0, 1.0)
        step *= config.step_decay
    best_key, best_u = max(order, key=lambda kv: kv[1])
    return SwarmResult(np.asarray(best_key), best_u, order)


def plan_with_values(plan: MergePlan, values: Sequence[float], lora_max_weight: float,
                     lora_caps: Sequence[float | None] | None = None, absolute_checkpoints: bool = False
                     ) -> MergePlan:
    """A copy of ``plan`` whose coefficients come from one value per expert (checkpoints first), turned into
    coefficients exactly as the planner does: checkpoint values normalised to sum 1 (or, with
    ``absolute_checkpoints``, taken as task-arithmetic scales, as ``vgae`` takes its Beta means), LoRA values
    normalised to sum 1 then scaled by ``lora_max_weight`` and capped at each LoRA's cap."""
    n_ck = len(plan.checkpoints)
    ck = checkpoint_coefficients(values[:n_ck], absolute_checkpoints)
    lo = scale_loras(normalise_checkpoints(values[n_ck:]), lora_max_weight, lora_caps)

    def with_coeff(experts: list[PlannedExpert], coeffs: list[float]) -> list[PlannedExpert]:
        return [e.model_copy(update={"coefficient": round(c, 6)}) for e, c in zip(experts, coeffs, strict=True)]

    return plan.model_copy(update={"checkpoints": with_coeff(plan.checkpoints, ck),
                                   "loras": with_coeff(plan.loras, lo)})


Score = Callable[[list["Image"], list[str]], list[float]]


@dataclass
class MergeUtility:
    """Utility of a coefficient vector: the mean ``score`` of images sampled from the merge it gives.

    Every evaluation samples the same ``prompts`` × ``seeds`` (per-image noise), so utilities differ only
    through the merge.
    """

    settings: Settings
    plan: MergePlan  # experts with local paths; coefficients are replaced per evaluation
    prompts: list[str]
    score: Score
    seeds: list[int] = field(default_factory=lambda: [0])
    steps: int = 4  # 0: the family's steps
    size: int = 64  # 0: the base's native resolution
    guidance: float | None = None  # None: the family's guidance
    lora_caps: list[float | None] | None = None
    generator: object | None = None
    absolute_checkpoints: bool = False  # checkpoint values are scales (vgae's reading), not shares

    def __call__(self, values: np.ndarray) -> float:
        from merger.generate import Generator

        if self.generator is None:
            self.generator = Generator(self.settings)
        plan = plan_with_values(self.plan, list(values), self.settings.lora_max_weight, self.lora_caps,
                                self.absolute_checkpoints)
        texts = [p for p in self.prompts for _ in self.seeds]
        seeds = [s for _ in self.prompts for s in self.seeds]
        result = self.generator.generate(plan, texts, steps=self.steps or None,  # type: ignore[attr-defined]
                                         guidance=self.guidance, width=self.size or None,
                                         height=self.size or None, seeds=seeds)
        scores = self.score(list(result.images), texts)
        return float(np.mean(scores))
