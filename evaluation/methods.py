"""The compared methods, each a small class behind one interface: ``plan(ctx, prompt) -> MergePlan``.

Every method samples with the same base model, scheduler, steps, size, guidance and per-image seeds; they
differ only in the merged weights. Definitions (θ_b the base, θ_i checkpoint expert i, τ_i = θ_i − θ_b;
"all checkpoints" = every checkpoint expert of the base family in the graph; ESA = the planner's Expert
Selection Agent, arXiv:2603.20470):

* ``direct`` — the base model alone (the paper's "Direct" rows).
* ``soup`` — Diffusion Soup (Biggs et al., 2024, arXiv:2406.08431): the uniform average of all checkpoints,
  θ = (1/n) Σ θ_i (``weighted_average``).
* ``dare`` — DARE (Yu et al., 2023, arXiv:2311.03099) on all checkpoints: drop each element of τ_i with
  probability p = 0.5, rescale the survivors by 1/(1 − p), and add with uniform weights,
  θ = θ_b + Σ (1/n) · m_i ⊙ τ_i / (1 − p), m_i ~ Bernoulli(1 − p) (seeded).
* ``swarms`` — Model Swarms (Feng et al., 2024, arXiv:2410.11163): particle-swarm search over the
  weights of all checkpoints, utility = mean score (the first requested available metric) of images of
  a few calibration prompts, under a budget of ``swarm_budget`` merges (see :mod:`planner.swarms`); one
  weight vector for every prompt, found once and cached in the output directory.
* ``fixed`` — "Ours fixed": ESA's selection with fixed coefficients (checkpoints uniform, LoRAs
  ``lora_max_weight / n``).
* ``k-lora`` — ESA's selection, its two strongest LoRAs combined by K-LoRA (Ouyang et al., 2025,
  arXiv:2502.18461): per attention layer, keep the LoRA whose sum of the top-k absolute entries of its
  weighted update ``w·ΔW`` is larger (k = the larger of the two ranks). The paper's timestep-dependent
  rescaling is not applied: the merged model here is fixed for the whole sampling run. With fewer than two
  LoRAs it is ``fixed``.
* ``similarity`` — ESA's selection, softmax of prompt–skill cosine (``planner.coefficients``).
* ``vgae`` — ours: ESA's selection, coefficients from the latest trained VGAE (Beta means, one forward
  pass). ``vgae-solo`` / ``vgae-merged`` use the latest checkpoint trained on solo capability scores /
  on merged outcomes (``diffgraph planner train --target merged``), for the ablation rows.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from core.types import DiffGraphError, ExpertKind, MergePlan, PlannedExpert, ValidationFailed
from evaluation.metrics import check_names

if TYPE_CHECKING:
    from core.settings import Settings
    from graphdb.store import GraphStore
    from planner.vgae_checkpoints import PlannerCheckpoint

DARE_DENSITY = 0.5
DARE_SEED = 0
PLAN_SEED = 0


@dataclass
class EvalContext:
    """What methods share during one evaluation run."""

    settings: Settings
    family: str
    base_model: str
    out_dir: Path
    store: GraphStore | None = None  # open only while plans are made
    checkpoints: list[PlannedExpert] = field(default_factory=list)  # all checkpoints, paths resolved
    calibration_prompts: list[str] = field(default_factory=list)
    utility: Any = None  # Callable[[images, prompts], list[float]] for swarms
    steps: int = 4
    size: int = 64
    swarm_budget: int = 12
    notes: dict[str, list[str]] = field(default_factory=dict)
    generator: Any = None  # merger.generate.Generator shared by the search and the sampling
    _agents: dict[str, Any] = field(default_factory=dict)

    def base_plan(self, method: str, prompt: str = "") -> MergePlan:
        return MergePlan(prompt=prompt, base_family=self.family, base_model=self.base_model, coefficients=method,
                         seed=PLAN_SEED)

    def note(self, method: str, text: str) -> None:
        notes = self.notes.setdefault(method, [])
        if text not in notes:
            notes.append(text)


class Method:
    """One row of the table. ``prepare`` does one-off work (outside the graph session); ``plan`` is per prompt."""

    name: ClassVar[str]
    needs_store: ClassVar[bool] = False

    def prepare(self, ctx: EvalContext) -> None:  # noqa: B027 - most methods need nothing
        pass

    def plan(self, ctx: EvalContext, prompt: str) -> MergePlan:
        raise NotImplementedError


class Direct(Method):
    name = "direct"

    def plan(self, ctx: EvalContext, prompt: str) -> MergePlan:
        return ctx.base_plan(self.name, prompt)


def _uniform(ctx: EvalContext, method: str) -> list[PlannedExpert]:
    if not ctx.checkpoints:
        raise DiffGraphError(f"{method} needs checkpoint experts of family {ctx.family} in the graph")
    n = len(ctx.checkpoints)
    return [e.model_copy(update={"coefficient": round(1.0 / n, 6)}) for e in ctx.checkpoints]


class Soup(Method):
    name = "soup"

    def plan(self, ctx: EvalContext, prompt: str) -> MergePlan:
        plan = ctx.base_plan(self.name, prompt)
        return plan.model_copy(update={"checkpoints": _uniform(ctx, self.name), "merge_method": "weighted_average"})


class Dare(Method):
    name = "dare"

    def plan(self, ctx: EvalContext, prompt: str) -> MergePlan:
        plan = ctx.base_plan(self.name, prompt)
        return plan.model_copy(update={"checkpoints": _uniform(ctx, self.name), "merge_method": "dare",
                                       "density": DARE_DENSITY, "seed": DARE_SEED})


class Swarms(Method):
    name = "swarms"
    weights: list[float] | None = None

    def prepare(self, ctx: EvalContext) -> None:
        from planner.swarms import MergeUtility, SwarmConfig, swarm_search

        experts = _uniform(ctx, self.name)
        if ctx.utility is None:
            raise DiffGraphError("swarms needs an available metric for its utility")
        key = hashlib.sha256(json.dumps([[e.expert_id, e.sha256] for e in experts] + [
            ctx.swarm_budget, ctx.steps, ctx.size, ctx.calibration_prompts, getattr(ctx.utility, "name", "")
        ]).encode()).hexdigest()[:16]
        cache = ctx.out_dir / "swarms.json"
        if cache.is_file():
            saved = json.loads(cache.read_text())
            if saved.get("key") == key:
                self.weights = saved["weights"]
        if self.weights is None:
            base = ctx.base_plan(self.name).model_copy(update={"checkpoints": experts})
            utility = MergeUtility(ctx.settings, base, ctx.calibration_prompts, ctx.utility, steps=ctx.steps,
                                   size=ctx.size, generator=ctx.generator)
            result = swarm_search(len(experts), utility, SwarmConfig(budget=ctx.swarm_budget))
            total = float(sum(result.best)) or 1.0
            self.weights = [float(v) / total for v in result.best]
            cache.write_text(json.dumps({"key": key, "weights": self.weights, "utility": result.best_utility,
                                         "evaluations": len(result.evaluations)}))
        ctx.note(self.name, f"swarms: budget {ctx.swarm_budget} merges on {len(ctx.calibration_prompts)} "
                            f"calibration prompts; weights {[round(w, 3) for w in self.weights]}")

    def plan(self, ctx: EvalContext, prompt: str) -> MergePlan:
        assert self.weights is not None, "prepare() first"
        experts = [e.model_copy(update={"coefficient": round(w, 6)})
                   for e, w in zip(ctx.checkpoints, self.weights, strict=True)]
        return ctx.base_plan(self.name, prompt).model_copy(update={"checkpoints": experts})


class Planned(Method):
    """A method whose plan comes from ESA (``planner_method`` gives its coefficients)."""

    needs_store = True
    planner_method: ClassVar[str] = "fixed"
    target: ClassVar[str | None] = None  # VGAE checkpoint target for the ablation rows

    def _checkpoint(self, ctx: EvalContext) -> PlannerCheckpoint | None:
        if self.target is None:
            return None
        from planner.vgae_checkpoints import latest_checkpoint

        ckpt = latest_checkpoint(ctx.settings, target=self.target)
        if ckpt is None:
            raise DiffGraphError(f"{self.name} needs a planner checkpoint trained with --target {self.target}: "
                                 f"run `diffgraph planner train --target {self.target}`")
        return ckpt

    def plan(self, ctx: EvalContext, prompt: str) -> MergePlan:
        from planner.agent import ExpertSelectionAgent

        if ctx.store is None:
            raise DiffGraphError("planning needs an open graph store")
        agent = ctx._agents.get(self.name)
        if agent is None:
            agent = ExpertSelectionAgent(ctx.settings, ctx.store, checkpoint=self._checkpoint(ctx))
            ctx._agents[self.name] = agent
        plan = agent.plan(prompt, method=self.planner_method, seed=PLAN_SEED)
        for note in plan.notes:
            if note.startswith("fallback:"):
                ctx.note(self.name, note)
        _resolve_paths(ctx, plan)
        return plan


class Fixed(Planned):
    name = "fixed"
    planner_method = "fixed"


class Similarity(Planned):
    name = "similarity"
    planner_method = "similarity"


class Vgae(Planned):
    name = "vgae"
    planner_method = "vgae"


class VgaeSolo(Vgae):
    name = "vgae-solo"
    target = "solo"


class VgaeMerged(Vgae):
    name = "vgae-merged"
    target = "merged"


class KLora(Planned):
    name = "k-lora"
    planner_method = "fixed"

    def plan(self, ctx: EvalContext, prompt: str) -> MergePlan:
        plan = super().plan(ctx, prompt)
        if len(plan.loras) < 2:
            return plan
        a, b = sorted(plan.loras, key=lambda e: -e.coefficient)[:2]
        path = k_lora_file(ctx.settings, a, b)
        combined = PlannedExpert(
            expert_id=f"k-lora:{path.stem}", name=f"K-LoRA({a.name}, {b.name})", kind=ExpertKind.lora,
            coefficient=1.0, path=str(path), reason=f"K-LoRA of {a.expert_id} and {b.expert_id}",
        )
        return plan.model_copy(update={"loras": [combined], "coefficients": self.name})


def _resolve_paths(ctx: EvalContext, plan: MergePlan) -> None:
    from crawler.downloads import ensure_local

    assert ctx.store is not None
    for pe in plan.experts:
        if not pe.path:
            pe.path = str(ensure_local(ctx.settings, ctx.store.get_expert(pe.expert_id)))


def k_lora_file(settings: Settings, a: PlannedExpert, b: PlannedExpert) -> Path:
    """Write (once, cached by inputs) the K-LoRA combination of LoRAs ``a`` and ``b`` at their strengths as a
    kohya file whose per-module scale is 1 (strength folded into ``up``)."""
    import torch

    from merger.lora import load_lora
    from merger.merge_writer import write_safetensors

    digest = hashlib.sha256(json.dumps([a.sha256 or a.path, a.coefficient, b.sha256 or b.path,
                                        b.coefficient]).encode()).hexdigest()[:24]
    out = Path(settings.data_dir) / "cache" / "k-lora" / f"{digest}.safetensors"
    if out.is_file():
        return out
    la = load_lora(Path(a.path or ""), allow_pickle=settings.allow_pickle, name=a.name)
    lb = load_lora(Path(b.path or ""), allow_pickle=settings.allow_pickle, name=b.name)
    if not (la.is_low_rank and lb.is_low_rank):
        raise DiffGraphError("k-lora combines low-rank LoRAs only")
    tensors: dict[str, torch.Tensor] = {}
    for key in sorted(set(la.deltas) | set(lb.deltas)):
        picks = [(d, w) for lora, w in ((la, a.coefficient), (lb, b.coefficient))
                 if (d := lora.deltas.get(key)) is not None]
        if len(picks) == 2:
            k = max(picks[0][0].rank or 1, picks[1][0].rank or 1)
            mags = [float(torch.topk((d.materialize() * w).abs().flatten(), min(k, d.numel)).values.sum())
                    for d, w in picks]
            picks = [picks[0] if mags[0] >= mags[1] else picks[1]]
        delta, w = picks[0]
        component, module = key.split(".", 1)
        prefix = {"unet": "lora_unet_", "text_encoder": "lora_te_"}.get(component)
        if prefix is None:
            raise ValidationFailed(f"k-lora: component {component} is not supported")
        name = prefix + module.replace(".", "_")
        rank = delta.rank or 1
        tensors[f"{name}.lora_down.weight"] = delta.down.contiguous().float()  # type: ignore[union-attr]
        tensors[f"{name}.lora_up.weight"] = (delta.up.float() * (delta.scale * w)).contiguous()  # type: ignore[union-attr]
        tensors[f"{name}.alpha"] = torch.tensor(float(rank))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    write_safetensors(tmp, tensors, {"ss_network_module": "networks.lora", "diffgraph": "k-lora"})
    tmp.replace(out)
    return out


METHODS: dict[str, type[Method]] = {
    m.name: m for m in (Direct, Dare, Soup, Swarms, Fixed, KLora, Similarity, Vgae, VgaeSolo, VgaeMerged)
}
DEFAULT_METHODS = ("direct", "dare", "soup", "swarms", "fixed", "k-lora", "similarity", "vgae")


def check_methods(names: list[str]) -> list[str]:
    return check_names("method", names, METHODS)
