"""A checkpoint merge as data: the :class:`MergeRecipe` the planner's plan becomes and the merger executes.

The sd-mecha idea of a recipe that is a value (printable, hashable, serialisable) rather than a call,
without its import-time registry of merge methods: the methods are the four names in :data:`MERGE_METHODS`.

One recipe is

* what :func:`merger.merge.merge` executes (and ``merged_checkpoint`` caches),
* what the merge cache keys on: :meth:`MergeRecipe.digest` of the recipe whose sources are their
  content hashes (:meth:`MergeRecipe.with_sources`), so a moved file keeps its cache entry,
* what the output carries in its safetensors ``__metadata__`` under :data:`METADATA_KEY` (JSON),
  readable back with :meth:`MergeRecipe.from_json`.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from core.types import MergePlan

MERGE_METHODS = ("weighted_average", "task_arithmetic", "ties", "dare")
METADATA_KEY = "diffgraph.recipe"
# The cache key's schema version. The ties formula changed once (v2: the agreeing experts' summed weight
# instead of their count), so ties keys are v2; the other methods' keys are unchanged since v1.
_KEY_VERSION = {"ties": 2}


@dataclass(frozen=True)
class MergeRecipe:
    """Base, weighted checkpoint experts, merge method with its hyperparameters, and output dtype.

    Args:
        base (`str`): the base checkpoint (a path, or its SHA-256 in a content-addressed recipe).
        experts (`tuple[tuple[str, float], ...]`): each expert (path or SHA-256) with its weight.
        merge_method (`str`): ``weighted_average`` | ``task_arithmetic`` | ``ties`` | ``dare``.
        density (`float`): ties/dare keep-rate. seed (`int`): dare's mask seed.
        dtype (`str`): the merged tensors' dtype (``fp16`` | ``fp32`` | ``bf16``).
        family (`str`, *optional*): the family to assume for a UNet-only base the keys cannot identify.
    """

    base: str
    experts: tuple[tuple[str, float], ...] = ()
    merge_method: str = "task_arithmetic"
    density: float = 0.5
    seed: int = 0
    dtype: str = "fp16"
    family: str | None = field(default=None)

    def __post_init__(self) -> None:
        # normalise so equal recipes compare, hash and serialise equally whatever types they were given
        object.__setattr__(self, "base", str(self.base))
        object.__setattr__(self, "experts", tuple((str(p), float(w)) for p, w in self.experts))
        object.__setattr__(self, "density", float(self.density))
        object.__setattr__(self, "seed", int(self.seed))

    @classmethod
    def from_plan(cls, plan: MergePlan, base: str, dtype: str) -> MergeRecipe:
        """The recipe of a plan's checkpoint merge; ``base`` is the resolved base path (the plan may name
        none). Every expert needs its local ``path`` (``ensure_local`` fills it in)."""
        missing = [e.expert_id for e in plan.checkpoints if not e.path]
        if missing:
            raise ValueError(f"checkpoint {missing[0]} in the plan has no local path (resolve it with ensure_local)")
        experts = tuple((os.path.expanduser(str(e.path)), e.coefficient) for e in plan.checkpoints)
        return cls(base=base, experts=experts,
                   merge_method=plan.merge_method, density=plan.density, seed=plan.seed, dtype=dtype)

    def with_sources(self, base: str, experts: list[str]) -> MergeRecipe:
        """The same recipe over other source names (e.g. content hashes), weights kept."""
        if len(experts) != len(self.experts):
            raise ValueError("one source per expert")
        return replace(self, base=base, experts=tuple((e, w) for e, (_, w) in zip(experts, self.experts, strict=True)))

    def to_dict(self) -> dict[str, Any]:
        return {"base": self.base, "experts": [[p, w] for p, w in self.experts], "merge_method": self.merge_method,
                "density": self.density, "seed": self.seed, "dtype": self.dtype, "family": self.family}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> MergeRecipe:
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("a merge recipe is a JSON object")
        unknown = set(data) - {"base", "experts", "merge_method", "density", "seed", "dtype", "family"}
        if unknown:
            raise ValueError(f"unknown merge recipe field(s): {', '.join(sorted(unknown))}")
        try:
            return cls(**{**data, "experts": tuple((p, w) for p, w in data.get("experts", []))})
        except (TypeError, ValueError) as exc:  # e.g. an expert that is not a [path, weight] pair
            raise ValueError(f"invalid merge recipe: {exc}") from None

    def digest(self) -> str:
        """A stable 32-hex-digit hash of what determines the merged tensors.

        Density only matters to ties/dare and the seed only to dare, so other methods share a digest across
        those settings. The hashed form is the one the merge cache has always used, so existing cache
        entries stay valid; ``family`` enters it only when set.
        """
        key: dict[str, Any] = {
            "v": _KEY_VERSION.get(self.merge_method, 1), "base": self.base,
            "experts": [[p, w] for p, w in self.experts], "method": self.merge_method, "dtype": self.dtype,
            "density": self.density if self.merge_method in ("ties", "dare") else None,
            "seed": self.seed if self.merge_method == "dare" else None,
        }
        if self.family is not None:
            key["family"] = self.family
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]
