"""Fusing LoRAs into a checkpoint while it is merged: each weighted LoRA delta is added to its tensor in the
same streaming pass (``W ← W + Σ wᵢ · scaleᵢ · ΔWᵢ`` in fp32, before the cast to the output dtype)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from core.families import arch_of
from merger.checkpoint_layout import Segment
from merger.errors import IncompatibleExpert
from merger.model_source import ModelSource, diffusers_names

if TYPE_CHECKING:
    import torch

    from merger.lora import LoraDelta, LoraDeltas

TensorHook = Callable[[str, "torch.Tensor"], "torch.Tensor"]


def _normalize(weight_key: str) -> str:
    component, _, rest = weight_key.partition(".")
    return f"{component}.{rest.removeprefix('text_model.')}"


def lora_fusion_hook(base: ModelSource, loras: Sequence[tuple[LoraDeltas, float]]) -> TensorHook:
    """A per-tensor hook that adds the weighted LoRA deltas targeting that tensor.

    Every LoRA module is matched to a base tensor up front, so an incompatible LoRA fails before anything
    is written.

    Raises:
        IncompatibleExpert: a LoRA made for another family, or a module the base lacks or whose shape differs
            (the message names the LoRA and the first such module).
    """
    names = diffusers_names(base)
    index: dict[str, tuple[str, Segment]] = {}
    for native, segs in names.items():
        for seg in segs:
            index.setdefault(_normalize(f"{seg.component}.{seg.key}"), (native, seg))
    per_tensor: dict[str, list[tuple[LoraDelta, float, Segment]]] = {}
    for lora, strength in loras:
        if lora.family and arch_of(lora.family) != base.family.arch:
            raise IncompatibleExpert(f"{lora.name} is a {lora.family} LoRA but the base {base.name} is "
                                     f"{base.family.name}")
        for module in sorted(lora.deltas):
            delta = lora.deltas[module]
            hit = index.get(_normalize(f"{module}.weight"))
            shape = _diffusers_shape(base, *hit) if hit is not None else None
            if shape is None or not delta.fits(shape):
                found = f"the base has {tuple(shape)}" if shape is not None else "the base has no such weight"
                raise IncompatibleExpert(f"{lora.name} does not fit the base: first mismatching key "
                                         f"{module}.weight {delta.shape()}, {found}")
            if strength != 0.0:
                per_tensor.setdefault(hit[0], []).append((delta, float(strength), hit[1]))

    def hook(native: str, tensor: torch.Tensor) -> torch.Tensor:
        for delta, strength, seg in per_tensor.get(native, ()):
            if seg.orig_rows is None and seg.diff_rows is None:
                tensor = tensor + strength * delta.materialize(tuple(tensor.shape))
                continue
            # one part of a fused tensor: the delta's rows diff_rows go to the tensor's rows orig_rows
            full = delta.materialize(_diffusers_shape(base, native, seg))
            d0, d1 = seg.diff_rows or (0, full.shape[0])
            o0, o1 = seg.orig_rows or (0, tensor.shape[0])
            tensor = tensor.clone()
            tensor[o0:o1] += strength * full[d0:d1]
        return tensor

    return hook


def _diffusers_shape(base: ModelSource, native: str, seg: Segment) -> tuple[int, ...]:
    """The shape of the diffusers tensor ``seg`` names, from the base tensor that holds (part of) it."""
    shape = tuple(base.ref(native).shape())
    if seg.conv_1x1 and len(shape) == 4:
        shape = shape[:2]
    if seg.diff_rows is None and seg.orig_rows is None:
        return shape
    if seg.diff_rows is not None and seg.key.startswith("norm_out.linear"):
        return (2 * (seg.diff_rows[1] - seg.diff_rows[0]), *shape[1:])
    rows = seg.orig_rows[1] - seg.orig_rows[0] if seg.orig_rows else shape[0]
    return (rows, *shape[1:])
