"""Source layouts of LoRA files, told apart by sentinel keys, each with one converter to diffusers naming.

| format | sentinel (any key) | converter |
|---|---|---|
| cloneofsimo ``lora_diffusion`` | ``unet:<i>:down`` / ``text_encoder:<i>:down`` | :func:`.cloneofsimo.convert_cloneofsimo_to_diffusers` |
| kohya / LyCORIS (LoRA, LoCon, LoHa, LoKr) | ``lora_unet_…`` / ``lora_te…`` with ``.lora_down.weight``, ``.hada_w1_a``, ``.lokr_w1[_a]`` | :func:`.kohya.convert_kohya_to_diffusers` |
| kohya FLUX / XLabs FLUX | ``lora_unet_double_blocks_…`` / ``double_blocks.<i>.processor.…`` | :mod:`.flux` (diffusers' converters) |
| diffusers / PEFT / attention processors | ``….lora_A.weight``, ``….lora.down.weight``, ``…_lora.down.weight`` | :func:`.diffusers.convert_diffusers_to_diffusers` |

Converters are pure: no I/O, no mutation of their inputs, no device moves. They return leftover keys, which
:func:`normalize_lora` refuses.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass

import torch

from merger.errors import CorruptWeights, MergeError
from merger.lora.deltas import LoraDelta, LoraDeltas, infer_family
from merger.lora.formats.cloneofsimo import SENTINEL as _CLONEOFSIMO_KEY
from merger.lora.formats.cloneofsimo import UnmappableCloneofsimo, convert_cloneofsimo_to_diffusers
from merger.lora.formats.diffusers import convert_diffusers_to_diffusers
from merger.lora.formats.flux import (
    convert_kohya_flux_to_diffusers,
    convert_xlabs_flux_to_diffusers,
    is_kohya_flux,
    is_xlabs_flux,
)
from merger.lora.formats.kohya import PREFIXES as _KOHYA_PREFIXES
from merger.lora.formats.kohya import convert_kohya_to_diffusers

Converted = tuple[str, dict[str, LoraDelta], dict[str, torch.Tensor], list[str]]
_MAX_LISTED = 8


class UnsupportedLora(MergeError):
    """A LoRA file whose layout, algorithm or keys cannot be applied exactly."""


@dataclass(frozen=True)
class LoraFormat:
    name: str
    detect: Callable[[Collection[str]], bool]
    convert: Callable[[Mapping[str, torch.Tensor], Mapping[str, str]], Converted]


def _is_kohya(keys: Collection[str]) -> bool:
    return any(k.startswith(tuple(_KOHYA_PREFIXES)) and "." in k for k in keys)


def _is_diffusers(keys: Collection[str]) -> bool:
    return any(k.endswith((".lora_A.weight", ".lora.down.weight", "_lora.down.weight",
                           ".lora_linear_layer.down.weight")) for k in keys)


#: Detection order matters only for files that would match several rows (none known).
FORMATS: tuple[LoraFormat, ...] = (
    LoraFormat("cloneofsimo", lambda keys: any(_CLONEOFSIMO_KEY.match(k) for k in keys),
               convert_cloneofsimo_to_diffusers),
    LoraFormat("kohya_flux", is_kohya_flux, convert_kohya_flux_to_diffusers),
    LoraFormat("xlabs_flux", is_xlabs_flux, convert_xlabs_flux_to_diffusers),
    LoraFormat("kohya", _is_kohya, convert_kohya_to_diffusers),
    LoraFormat("diffusers", _is_diffusers, convert_diffusers_to_diffusers),
)


def detect_format(keys: Collection[str]) -> LoraFormat:
    """The first :data:`FORMATS` row whose sentinel matches ``keys``.

    Raises:
        UnsupportedLora: no row matches (not a LoRA, or an unknown layout).
    """
    for fmt in FORMATS:
        if fmt.detect(keys):
            return fmt
    sample = ", ".join(sorted(keys)[:3])
    raise UnsupportedLora(f"not a LoRA in any known layout (kohya, LyCORIS, diffusers/PEFT, attention "
                          f"processors, cloneofsimo); first keys: {sample or 'none'}")


def normalize_lora(state_dict: Mapping[str, torch.Tensor], metadata: Mapping[str, str], name: str) -> LoraDeltas:
    """Turn a LoRA state dict of any known layout into :class:`LoraDeltas` (diffusers naming).

    Raises:
        UnsupportedLora: unknown layout, keys that no converter consumed (listed), an unmappable file.
    """
    fmt = detect_format(state_dict.keys())
    try:
        label, deltas, embeddings, leftover = fmt.convert(state_dict, metadata)
    except UnmappableCloneofsimo as exc:
        raise UnsupportedLora(f"{name}: cloneofsimo lora_diffusion format refused: {exc}; "
                              "its entries name no modules, so the mapping cannot be verified") from None
    except CorruptWeights as exc:  # a malformed factor: say which file
        raise CorruptWeights(f"{name}: {exc}") from None
    if leftover:
        listed = ", ".join(leftover[:_MAX_LISTED]) + (f" (+{len(leftover) - _MAX_LISTED} more)"
                                                      if len(leftover) > _MAX_LISTED else "")
        raise UnsupportedLora(f"{name}: {len(leftover)} key(s) of this {label} LoRA cannot be applied: {listed}")
    if not deltas:
        raise UnsupportedLora(f"{name}: {label} LoRA holds no module updates")
    return LoraDeltas(name=name, format=label, deltas=deltas, family=infer_family(deltas),
                      embeddings=embeddings, metadata=dict(metadata))


__all__ = ["FORMATS", "LoraFormat", "UnsupportedLora", "detect_format", "normalize_lora"]
