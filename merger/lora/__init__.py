"""LoRAs in every common on-disk layout, normalised to per-module deltas, and their weighted application.

``load_lora`` reads a file (kohya, LyCORIS LoCon/LoHa/LoKr, diffusers/PEFT, attention processors,
cloneofsimo) into :class:`LoraDeltas`; ``fuse_loras`` adds ``Σ wᵢ · scaleᵢ · ΔWᵢ`` to a state dict or module.
"""

from merger.lora.deltas import LoraDelta, LoraDeltas
from merger.lora.formats import UnsupportedLora, detect_format, normalize_lora
from merger.lora.fuse import check_fits, fuse_loras, fused_loras, lora_updates, restore_weights
from merger.lora.load import load_lora
from merger.lora.peft import convert_deltas_to_peft

__all__ = [
    "LoraDelta",
    "LoraDeltas",
    "UnsupportedLora",
    "check_fits",
    "convert_deltas_to_peft",
    "detect_format",
    "fuse_loras",
    "fused_loras",
    "load_lora",
    "lora_updates",
    "normalize_lora",
    "restore_weights",
]
