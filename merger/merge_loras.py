"""Fusing LoRAs into a checkpoint while it is merged: each weighted LoRA delta is added to its tensor in the
same streaming pass (``W ← W + Σ wᵢ · scaleᵢ · ΔWᵢ`` in fp32, before the cast to the output dtype)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from merger.checkpoint import ModelSource, diffusers_names
from merger.errors import IncompatibleExpert

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
    index = {f"{w.component}.{w.key}": native for native, w in names.items()}
    per_tensor: dict[str, list[tuple[LoraDelta, float]]] = {}
    for lora, strength in loras:
        if lora.family and lora.family != base.family.name:
            raise IncompatibleExpert(f"{lora.name} is a {lora.family} LoRA but the base {base.name} is "
                                     f"{base.family.name}")
        for module in sorted(lora.deltas):
            delta = lora.deltas[module]
            native = index.get(_normalize(f"{module}.weight"))
            shape = base.ref(native).shape() if native is not None else None
            if shape is None or not delta.fits(shape):
                found = f"the base has {tuple(shape)}" if shape is not None else "the base has no such weight"
                raise IncompatibleExpert(f"{lora.name} does not fit the base: first mismatching key "
                                         f"{module}.weight {delta.shape()}, {found}")
            if strength != 0.0:
                per_tensor.setdefault(native, []).append((delta, float(strength)))

    def hook(native: str, tensor: torch.Tensor) -> torch.Tensor:
        for delta, strength in per_tensor.get(native, ()):
            tensor = tensor + strength * delta.materialize(tuple(tensor.shape))
        return tensor

    return hook
