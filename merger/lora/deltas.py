"""The normalised form of every LoRA layout: per-target-module deltas with their scale, in diffusers naming."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

from merger.errors import CorruptWeights

#: Components a delta may target, in diffusers pipeline naming.
COMPONENTS = ("unet", "text_encoder", "text_encoder_2", "transformer")


# What converting one module of a malformed file raises (a missing partner tensor, factors of the wrong
# rank or shape, a zero rank): converters report the module as not applicable instead of crashing.
MALFORMED_MODULE: tuple[type[Exception], ...] = (KeyError, IndexError, RuntimeError, ValueError, ZeroDivisionError,
                                                 CorruptWeights)


@dataclass(frozen=True)
class LoraDelta:
    """One module's update ``ΔW = scale · up @ down`` (low rank) or ``ΔW = scale · build()`` (full).

    ``up``/``down`` keep the file's layout: ``(out, r)``/``(r, in)`` for linear layers and
    ``(out, r, 1, 1)``/``(r, in, kh, kw)`` for convolutions. Updates that are not low rank (LoHa, LoKr,
    LoCon with a Tucker core) keep their factors inside ``build``, which returns the unscaled float32 ΔW
    of ``full_shape`` only when it is applied (materialising every LoKr module of a file at load time
    would cost a whole model of memory). A full update may be flattened to ``(out, in·kh·kw)``; it is
    reshaped to the target weight when applied, as LyCORIS and A1111 do.
    """

    scale: float
    up: torch.Tensor | None = None
    down: torch.Tensor | None = None
    full_shape: tuple[int, ...] | None = None
    build: Callable[[], torch.Tensor] | None = None

    def __post_init__(self) -> None:
        if (self.build is None or self.full_shape is None) == (self.up is None or self.down is None):
            raise ValueError("a LoraDelta has either up+down or build+full_shape")  # a converter's bug
        # The factors come from a downloaded file: wrong shapes are the file's fault, reported as such.
        if self.build is None:
            up, down = tuple(self.up.shape), tuple(self.down.shape)  # type: ignore[union-attr]
            if len(up) < 2 or len(down) < 2:
                raise CorruptWeights(f"LoRA factors must be matrices or conv kernels: up {up}, down {down}")
            if up[1] != down[0]:
                raise CorruptWeights(f"LoRA rank mismatch: up {up} vs down {down}")
        if not math.isfinite(self.scale):
            raise CorruptWeights(f"non-finite LoRA scale {self.scale}")

    @property
    def is_low_rank(self) -> bool:
        return self.build is None

    @property
    def rank(self) -> int | None:
        return int(self.down.shape[0]) if self.down is not None else None

    @property
    def out_features(self) -> int:
        return int(self.full_shape[0] if self.full_shape is not None else self.up.shape[0])  # type: ignore[union-attr]

    @property
    def numel(self) -> int:
        """Number of elements of the (flattened) update, for shape checks against a weight."""
        if self.full_shape is not None:
            return math.prod(self.full_shape)
        return int(self.up.shape[0]) * int(math.prod(self.down.shape[1:]))  # type: ignore[union-attr]

    def shape(self) -> tuple[int, ...]:
        """Natural shape of ΔW as stored (before any reshape to the target weight)."""
        if self.full_shape is not None:
            return self.full_shape
        up, down = self.up, self.down
        assert up is not None and down is not None
        if down.dim() == 4:
            return (int(up.shape[0]), *down.shape[1:])
        return (int(up.shape[0]), int(down.shape[1]))

    def fits(self, weight_shape: torch.Size | tuple[int, ...]) -> bool:
        """Whether this update can be added to a weight of ``weight_shape`` (same out dim and size)."""
        return int(weight_shape[0]) == self.out_features and math.prod(weight_shape) == self.numel

    def materialize(self, weight_shape: torch.Size | tuple[int, ...] | None = None) -> torch.Tensor:
        """``scale · ΔW`` in float32, reshaped to ``weight_shape`` when given (it must :meth:`fit`)."""
        if self.build is not None:
            delta = self.build().float().mul_(self.scale)
        else:
            up, down = self.up, self.down
            assert up is not None and down is not None
            delta = (up.float().flatten(1) @ down.float().flatten(1)).mul_(self.scale)
        shape = tuple(weight_shape) if weight_shape is not None else self.shape()
        if not self.fits(shape):
            raise ValueError(f"delta of shape {self.shape()} does not fit a weight of shape {shape}")
        return delta.reshape(shape)


@dataclass(frozen=True)
class LoraDeltas:
    """A LoRA file after normalisation.

    ``deltas`` maps ``<component>.<module path>`` (diffusers naming, e.g.
    ``unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q``) to its :class:`LoraDelta`.
    ``family`` is the base family the file was made for when it can be told from its keys (``sd15``,
    ``sd2``, ``sdxl``) else ``None``. ``embeddings`` are learned token embeddings some formats carry
    (pivotal tuning); they are kept, not fused.
    """

    name: str
    format: str
    deltas: Mapping[str, LoraDelta]
    family: str | None = None
    embeddings: Mapping[str, torch.Tensor] = field(default_factory=dict)
    metadata: Mapping[str, str] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.deltas)

    @property
    def is_low_rank(self) -> bool:
        """True when every delta is a plain ``up @ down`` (what peft adapters can hold)."""
        return all(d.is_low_rank for d in self.deltas.values())

    @property
    def components(self) -> set[str]:
        return {key.split(".", 1)[0] for key in self.deltas}


def infer_family(deltas: Mapping[str, LoraDelta]) -> str | None:
    """The architecture told by the keys (FLUX: a ``transformer``) or the cross-attention width of ``attn2.to_k`` (768 → sd15, 1024 → sd2, 2048 → sdxl)."""
    if any(key.startswith("text_encoder_2.") for key in deltas):
        return "sdxl"
    if any(key.startswith("transformer.") for key in deltas):
        return "flux"
    for key, delta in deltas.items():
        if key.startswith("unet.") and key.endswith("attn2.to_k"):
            width = delta.numel // delta.out_features
            return {768: "sd15", 1024: "sd2", 2048: "sdxl"}.get(width)
    return None
