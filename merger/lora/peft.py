"""Normalised LoRAs as diffusers/PEFT adapters (for ``load_lora_weights`` + ``set_adapters``)."""

from __future__ import annotations

import torch

from merger.lora.deltas import LoraDeltas
from merger.lora.formats import UnsupportedLora


def convert_deltas_to_peft(lora: LoraDeltas) -> dict[str, torch.Tensor]:
    """``{<module>.lora_A.weight: down, <module>.lora_B.weight: scale·up}`` for ``load_lora_weights``.

    The scale is folded into ``lora_B`` so the adapter loads with peft's default ``lora_alpha = r`` (scale
    1) and needs no alpha metadata, which diffusers otherwise loses (see measured facts).

    Raises:
        UnsupportedLora: a delta is not low rank (LoHa, LoKr, LoCon with a Tucker core): fuse those instead.
    """
    if not lora.is_low_rank:
        raise UnsupportedLora(f"{lora.name}: {lora.format} updates are not low rank and cannot be a peft "
                              "LoRA adapter; fuse it instead")
    out: dict[str, torch.Tensor] = {}
    for module, delta in lora.deltas.items():
        assert delta.up is not None and delta.down is not None
        out[f"{module}.lora_A.weight"] = delta.down.float().contiguous()
        out[f"{module}.lora_B.weight"] = (delta.up.float() * delta.scale).contiguous()
    return out
