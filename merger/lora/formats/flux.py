"""FLUX.1 LoRA layouts diffusers has converters for: kohya/sd-scripts (``lora_unet_double_blocks_0_img_attn_qkv``,
fused q|k|v split into q, k, v) and XLabs (``double_blocks.0.processor.qkv_lora1.down.weight``).

Both go through diffusers' own ``_convert_kohya_flux_lora_to_diffusers`` / ``_convert_xlabs_flux_lora_to_diffusers``
(which fold alpha into the factors) and then through the diffusers/PEFT normaliser. ai-toolkit files are
already diffusers-named (``transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight``).
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Mapping

import torch

from merger.lora.deltas import LoraDelta
from merger.lora.formats.diffusers import convert_diffusers_to_diffusers

_KOHYA_FLUX = ("lora_unet_double_blocks_", "lora_unet_single_blocks_", "lora_unet_final_layer", "lora_unet_img_in",
               "lora_unet_txt_in", "lora_unet_time_in", "lora_unet_vector_in", "lora_unet_guidance_in")


def is_kohya_flux(keys: Collection[str]) -> bool:
    return any(k.startswith(_KOHYA_FLUX) for k in keys)


def is_xlabs_flux(keys: Collection[str]) -> bool:
    return any(k.startswith(("double_blocks.", "single_blocks.")) and ".processor." in k for k in keys)


def _through(converter_name: str, state_dict: Mapping[str, torch.Tensor], label: str
             ) -> tuple[str, dict[str, LoraDelta], dict[str, torch.Tensor], list[str]]:
    from diffusers.loaders import lora_conversion_utils as lcu

    log = logging.getLogger("diffusers.loaders.lora_conversion_utils")
    converter = getattr(lcu, converter_name)
    copy = {k: v for k, v in state_dict.items()}  # diffusers' converters pop from their input
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        converted = converter(copy)
    except (KeyError, ValueError, RuntimeError, AssertionError) as exc:
        return label, {}, {}, [f"(diffusers' {converter_name} failed: {type(exc).__name__}: {exc})"]
    finally:
        log.setLevel(level)
    converted = {(k if k.startswith(("transformer.", "text_encoder.")) else f"transformer.{k}"): v
                 for k, v in converted.items()}
    _, deltas, embeddings, leftover = convert_diffusers_to_diffusers(converted, {})
    # diffusers' converters drop (with a warning) the few keys they cannot place, e.g. norm "diff" tensors
    return label, deltas, embeddings, leftover


def convert_kohya_flux_to_diffusers(state_dict: Mapping[str, torch.Tensor], metadata: Mapping[str, str]
                                    ) -> tuple[str, dict[str, LoraDelta], dict[str, torch.Tensor], list[str]]:
    return _through("_convert_kohya_flux_lora_to_diffusers", state_dict, "kohya_flux")


def convert_xlabs_flux_to_diffusers(state_dict: Mapping[str, torch.Tensor], metadata: Mapping[str, str]
                                    ) -> tuple[str, dict[str, LoraDelta], dict[str, torch.Tensor], list[str]]:
    return _through("_convert_xlabs_flux_lora_to_diffusers", state_dict, "xlabs_flux")
