"""Kohya naming (``lora_unet_…``, ``lora_te_…``, ``lora_te1_…``, ``lora_te2_…``) → diffusers module names.

Kohya flattens a module path by replacing dots with underscores. The path is restored by splitting on
underscores and re-joining the multi-word identifiers diffusers and transformers use (``down_blocks``,
``to_q``, ``self_attn``, …). The per-module tensors are then converted by the algorithm they carry:
LoRA/LoCon (:mod:`.locon`), LoHa (:mod:`.loha`) or LoKr (:mod:`.lokr`).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Mapping

import torch

from merger.lora.deltas import MALFORMED_MODULE, LoraDelta
from merger.lora.formats import locon, loha, lokr

#: kohya prefix → diffusers pipeline component.
PREFIXES = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder",
            "lora_te2_": "text_encoder_2"}

#: Identifiers that contain underscores, longest first within each starting word. Anything else is a
#: single path segment. SDXL-era kohya files use the LDM UNet names (``input_blocks``…) which are kept
#: as such; they do not exist in a diffusers UNet and are reported as incompatible when fused.
_COMPOUNDS = sorted(
    {
        # diffusers UNet
        "down_blocks", "up_blocks", "mid_block", "transformer_blocks", "to_q", "to_k", "to_v", "to_out",
        "proj_in", "proj_out", "time_emb_proj", "conv_shortcut", "conv_in", "conv_out", "conv_norm_out",
        "time_embedding", "linear_1", "linear_2", "add_embedding", "add_k_proj", "add_v_proj",
        # transformers CLIP
        "text_model", "self_attn", "q_proj", "k_proj", "v_proj", "out_proj", "final_layer_norm",
        "text_projection", "token_embedding", "position_embedding", "layer_norm1", "layer_norm2",
        # LDM UNet (SDXL kohya)
        "input_blocks", "output_blocks", "middle_block", "in_layers", "out_layers", "emb_layers",
        "skip_connection", "time_embed", "label_emb",
    },
    key=lambda s: -s.count("_"),
)
_COMPOUND_PARTS = [tuple(c.split("_")) for c in _COMPOUNDS]

#: suffix that identifies a module's algorithm → (allowed suffixes, converter, label)
_ALGORITHMS: dict[str, tuple[frozenset[str], Callable[[Mapping[str, torch.Tensor]], LoraDelta], str]] = {
    locon.SENTINEL: (locon.SUFFIXES, locon.convert_locon_module, "lora"),
    loha.SENTINEL: (loha.SUFFIXES, loha.convert_loha_module, "loha"),
    **{s: (lokr.SUFFIXES, lokr.convert_lokr_module, "lokr") for s in lokr.SENTINELS},
}


def kohya_name_to_diffusers(name: str) -> str | None:
    """``lora_unet_down_blocks_0_attentions_0_proj_in`` → ``unet.down_blocks.0.attentions.0.proj_in``.

    Returns None when the name has no kohya prefix.
    """
    prefix = next((p for p in sorted(PREFIXES, key=len, reverse=True) if name.startswith(p)), None)
    if prefix is None:
        return None
    component, words = PREFIXES[prefix], name[len(prefix):].split("_")
    segments: list[str] = []
    i = 0
    while i < len(words):
        for parts in _COMPOUND_PARTS:
            if tuple(words[i:i + len(parts)]) == parts:
                segments.append("_".join(parts))
                i += len(parts)
                break
        else:
            segments.append(words[i])
            i += 1
    return f"{component}.{'.'.join(segments)}"


_SGM_BLOCKS = ("input_blocks", "middle_block", "output_blocks")
#: Inner names of the original (SGM/LDM) UNet that diffusers' block remapping leaves as they are.
_SGM_INNER = (("lora_unet_input_blocks_", "lora_unet_down_blocks_"), ("lora_unet_middle_block_", "lora_unet_mid_block_"),
              ("lora_unet_output_blocks_", "lora_unet_up_blocks_"), ("_in_layers_2", "_conv1"), ("_out_layers_3", "_conv2"), ("_emb_layers_1", "_time_emb_proj"),
              ("_skip_connection", "_conv_shortcut"), ("_downsamplers_0_op", "_downsamplers_0_conv"))
_SGM_TOP = (("lora_unet_time_embed_0", "lora_unet_time_embedding_linear_1"),
            ("lora_unet_time_embed_2", "lora_unet_time_embedding_linear_2"),
            ("lora_unet_label_emb_0_0", "lora_unet_add_embedding_linear_1"),
            ("lora_unet_label_emb_0_2", "lora_unet_add_embedding_linear_2"),
            ("lora_unet_input_blocks_0_0", "lora_unet_conv_in"), ("lora_unet_out_2", "lora_unet_conv_out"))


def convert_sgm_names_to_diffusers(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """SDXL kohya files name UNet modules by the original blocks (``lora_unet_input_blocks_4_1_…``).

    Block indices are remapped by diffusers' own ``_maybe_map_sgm_blocks_to_diffusers`` (with SDXL's two
    layers per block, which every SDXL-architecture model has); the resnet-internal names it leaves are
    renamed here as its ``_convert_unet_lora_key`` does. Returns a new dict (the input is not modified).
    """
    from types import SimpleNamespace

    from diffusers.loaders.lora_conversion_utils import _maybe_map_sgm_blocks_to_diffusers

    top = {}
    rest = {}
    for key, tensor in state_dict.items():
        hit = next(((o, n) for o, n in _SGM_TOP if key.startswith(o + ".")), None)
        if hit is not None:
            top[hit[1] + key[len(hit[0]):]] = tensor
        else:
            rest[key] = tensor
    mapped = _maybe_map_sgm_blocks_to_diffusers(rest, SimpleNamespace(layers_per_block=2))
    out = dict(top)
    for key, tensor in mapped.items():
        module, dot, suffix = key.partition(".")
        for old, new in _SGM_INNER:
            module = module.replace(old, new)
        out[module + dot + suffix] = tensor
    return out


def convert_kohya_to_diffusers(
    state_dict: Mapping[str, torch.Tensor], metadata: Mapping[str, str]
) -> tuple[str, dict[str, LoraDelta], dict[str, torch.Tensor], list[str]]:
    """Convert a kohya-named file (kohya LoRA, LyCORIS LoCon/LoHa/LoKr).

    Returns ``(format label, deltas, embeddings, leftover keys)``; the caller refuses leftovers.
    """
    groups: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    leftover: list[str] = []
    if any(k.startswith("lora_unet_") and any(p in k for p in _SGM_BLOCKS) for k in state_dict):
        state_dict = convert_sgm_names_to_diffusers(state_dict)
    for key, tensor in state_dict.items():
        module, _, suffix = key.partition(".")
        if not suffix or kohya_name_to_diffusers(module) is None:
            leftover.append(key)
            continue
        groups[module][suffix] = tensor
    deltas: dict[str, LoraDelta] = {}
    algos: set[str] = set()
    for module, parts in groups.items():
        algo = next((a for s, a in _ALGORITHMS.items() if s in parts), None)
        if algo is None:
            leftover.extend(f"{module}.{s}" for s in parts)
            continue
        allowed, convert, label = algo
        extra = sorted(set(parts) - allowed)
        if extra:
            leftover.extend(f"{module}.{s}" for s in extra)
            continue
        try:
            delta = convert(parts)
        except MALFORMED_MODULE as exc:  # missing partner tensor or bad shapes
            leftover.extend(f"{module}.{s} ({exc.__class__.__name__}: {exc})" for s in sorted(parts)[:1])
            continue
        target = kohya_name_to_diffusers(module)
        assert target is not None
        deltas[target] = delta
        algos.add(label)
    network = metadata.get("ss_network_module", "")
    if algos <= {"lora"}:
        has_conv = any(d.down is not None and d.down.dim() == 4 and d.down.shape[-1] > 1 for d in deltas.values())
        label = "lycoris_locon" if ("lycoris" in network or has_conv) else "kohya"
    else:
        label = "lycoris_" + "+".join(sorted(algos))
    return label, deltas, {}, leftover
