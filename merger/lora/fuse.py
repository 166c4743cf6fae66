"""Weighted fusion of normalised LoRAs into weights: ``W ← W + Σ wᵢ · scaleᵢ · ΔWᵢ`` (float32 accumulation)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from merger.errors import IncompatibleExpert
from merger.lora.deltas import LoraDelta, LoraDeltas

WeightedLoras = Sequence[tuple[LoraDeltas, float]]


def _aliases(key: str) -> Iterator[str]:
    yield key
    # transformers 5 dropped the ``text_model`` wrapper of CLIPTextModel; LoRA files still name it.
    bare = key.replace(".text_model.", ".", 1)
    yield bare
    # a module wrapped by peft adapters keeps its own weight under ``base_layer``
    for k in (key, bare):
        yield k.removesuffix(".weight") + ".base_layer.weight"


def _resolve(key: str, weights: Mapping[str, object]) -> str:
    """The weight key ``key`` names in this base (``key`` itself, or a known alias of it)."""
    return next((k for k in _aliases(key) if k in weights), key)


def check_fits(weights: Mapping[str, torch.Size | tuple[int, ...]], loras: WeightedLoras) -> dict[tuple[int, str], str]:
    """Check every LoRA module against the base's weight shapes without computing anything.

    Returns ``{(lora index, module): weight key in the base}``.

    Raises:
        IncompatibleExpert: a LoRA module has no weight in ``weights`` or its shape does not fit; the message
            names the LoRA, the module and both shapes (and the LoRA's family when known).
    """
    keys: dict[tuple[int, str], str] = {}
    for index, (lora, _) in enumerate(loras):
        for module, delta in lora.deltas.items():
            key = _resolve(f"{module}.weight", weights)
            shape = weights.get(key)
            if shape is None or not delta.fits(shape):
                family = f" (a {lora.family} LoRA)" if lora.family else ""
                found = f"the base has {tuple(shape)}" if shape is not None else "the base has no such weight"
                raise IncompatibleExpert(
                    f"{lora.name}{family} does not fit the base: first mismatching key {module}.weight "
                    f"{delta.shape()}, {found}"
                )
            keys[(index, module)] = key
    return keys


def lora_updates(weights: Mapping[str, torch.Size | tuple[int, ...]], loras: WeightedLoras) -> dict[str, torch.Tensor]:
    """The summed float32 update ``Σ wᵢ · scaleᵢ · ΔWᵢ`` per weight key of the base (``<module>.weight``).

    Raises:
        IncompatibleExpert: see :func:`check_fits` (checked for all LoRAs before any work).
    """
    keys = check_fits(weights, loras)
    groups: dict[str, list[tuple[LoraDelta, float]]] = {}
    for index, (lora, strength) in enumerate(loras):
        if strength == 0.0:
            continue
        for module, delta in lora.deltas.items():
            groups.setdefault(keys[(index, module)], []).append((delta, float(strength)))
    updates: dict[str, torch.Tensor] = {}
    for key, items in groups.items():
        shape = weights[key]
        low = [(d, w) for d, w in items if d.is_low_rank]
        update: torch.Tensor | None = None
        if low:
            # One matmul over the stacked ranks: [w₁s₁B₁ … wₙsₙBₙ] @ [A₁; …; Aₙ] = Σ wᵢ sᵢ BᵢAᵢ, writing the
            # full-size result once instead of once per LoRA.
            ups = torch.cat([d.up.float().flatten(1) * (d.scale * w) for d, w in low], dim=1)  # type: ignore[union-attr]
            downs = torch.cat([d.down.float().flatten(1) for d, _ in low], dim=0)  # type: ignore[union-attr]
            update = (ups @ downs).reshape(shape)
        for delta, w in items:
            if not delta.is_low_rank:
                full = delta.materialize(shape).mul_(w)
                update = full if update is None else update.add_(full)
        assert update is not None
        updates[key] = update
    return updates


def fuse_loras(target: Mapping[str, torch.Tensor] | nn.Module, loras: WeightedLoras) -> dict[str, torch.Tensor]:
    """Fuse weighted LoRAs into a state dict or a module.

    Args:
        target: a state dict keyed ``<component>.<module>.weight`` (diffusers naming, e.g.
            ``unet.mid_block.attentions.0.proj_in.weight``), or an ``nn.Module`` whose parameters are named
            that way (e.g. ``nn.ModuleDict({"unet": pipe.unet, "text_encoder": pipe.text_encoder})``).
        loras: ``[(LoraDeltas, strength), …]``.

    Returns:
        For a state dict: a NEW state dict (the input is not modified; untouched tensors are shared).
        For a module: the module is updated in place and the ORIGINAL tensors of the changed weights are
        returned, so :func:`restore_weights` can undo the fusion bit-exactly.

    Raises:
        IncompatibleExpert: see :func:`lora_updates`; nothing is modified in that case.
    """
    if isinstance(target, nn.Module):
        params = dict(target.named_parameters())
        updates = lora_updates({k: p.shape for k, p in params.items()}, loras)
        originals: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for key, update in updates.items():
                param = params[key]
                originals[key] = param.detach().clone()
                param.copy_((param.float() + update.to(param.device)).to(param.dtype))
        return originals
    updates = lora_updates({k: v.shape for k, v in target.items()}, loras)
    fused = dict(target)
    for key, update in updates.items():
        weight = target[key]
        fused[key] = (weight.float() + update.to(weight.device)).to(weight.dtype)
    return fused


def restore_weights(module: nn.Module, originals: Mapping[str, torch.Tensor]) -> None:
    """Put back the tensors :func:`fuse_loras` returned for ``module``."""
    params = dict(module.named_parameters())
    with torch.no_grad():
        for key, original in originals.items():
            params[key].copy_(original)


@contextmanager
def fused_loras(module: nn.Module, loras: WeightedLoras) -> Iterator[nn.Module]:
    """Fuse ``loras`` into ``module`` for the length of the block, then restore the exact original weights."""
    originals = fuse_loras(module, loras)
    try:
        yield module
    finally:
        restore_weights(module, originals)
