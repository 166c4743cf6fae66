"""Diffusers-named LoRA files: PEFT (``….lora_A/lora_B.weight``), diffusers ``save_lora_weights``
(``….lora.down/up.weight``, ``….lora_linear_layer.down/up.weight``) and the older attention-processor layout
(``…attn1.processor.to_k_lora.down.weight``, saved by ``unet.save_attn_procs``).

Scale: a per-module ``.alpha`` tensor (network alphas) gives ``alpha / r``; otherwise PEFT adapter metadata
(``lora_adapter_metadata``: ``<component>.lora_alpha``, ``.alpha_pattern``, ``.use_rslora``) gives
``alpha / r`` (or ``alpha / √r``); otherwise the scale is 1 — diffusers' own default.
"""

from __future__ import annotations

import json
import math
import re
from collections import defaultdict
from collections.abc import Mapping

import torch

from merger.lora.deltas import COMPONENTS, MALFORMED_MODULE, LoraDelta

#: key suffix → (role, layout label)
_SUFFIXES = {
    ".lora_A.weight": ("down", "peft"),
    ".lora_B.weight": ("up", "peft"),
    ".lora.down.weight": ("down", "diffusers"),
    ".lora.up.weight": ("up", "diffusers"),
    ".lora_linear_layer.down.weight": ("down", "diffusers"),
    ".lora_linear_layer.up.weight": ("up", "diffusers"),
    "_lora.down.weight": ("down", "attn_procs"),
    "_lora.up.weight": ("up", "attn_procs"),
    ".alpha": ("alpha", ""),
}
_ATTN_PROC = re.compile(r"(?:\.processor)?\.(to_q|to_k|to_v|to_out)$")
_PEFT_WRAPPER = "base_model.model."
_TE_PROJ = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}


def _module_name(stem: str, layout: str) -> str:
    """Turn a key stem into ``<component>.<diffusers module path>``."""
    if stem.startswith(_PEFT_WRAPPER):  # a raw ``PeftModel.save_pretrained`` file names no component
        stem = stem[len(_PEFT_WRAPPER):]
        if stem.startswith(("text_model.", "encoder.layers.")):
            stem = "text_encoder." + stem
    component = stem.split(".", 1)[0]
    if component not in COMPONENTS:  # unet-only saves (attn procs, old scripts) carry no prefix
        stem, component = f"unet.{stem}", "unet"
    if layout == "attn_procs":
        match = _ATTN_PROC.search(stem)
        if match:
            proj = match.group(1)
            if component.startswith("text_encoder"):
                new = "." + _TE_PROJ[proj]
            else:
                new = ".to_out.0" if proj == "to_out" else "." + proj
            stem = stem[: match.start()] + new
    return stem


def _peft_alpha(metadata: Mapping[str, str], module: str) -> tuple[float | None, bool]:
    """(alpha, use_rslora) for a module from diffusers' ``lora_adapter_metadata``, if present."""
    component, _, path = module.partition(".")
    raw = metadata.get("lora_adapter_metadata")
    if not raw and metadata.get("peft_adapter_config"):
        # the adapter_config.json beside a raw PeftModel save: one config for the file's one component
        try:
            plain = json.loads(metadata["peft_adapter_config"])
        except json.JSONDecodeError:
            return None, False
        raw = json.dumps({f"{component}.{k}": v for k, v in plain.items()}) if isinstance(plain, dict) else ""
    if not raw:
        return None, False
    try:
        config = json.loads(raw)
    except json.JSONDecodeError:
        return None, False
    alpha = config.get(f"{component}.lora_alpha")
    for pattern, value in (config.get(f"{component}.alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?{re.escape(pattern)}$", path):
            alpha = value
    return (float(alpha) if alpha is not None else None), bool(config.get(f"{component}.use_rslora"))


def convert_diffusers_to_diffusers(
    state_dict: Mapping[str, torch.Tensor], metadata: Mapping[str, str]
) -> tuple[str, dict[str, LoraDelta], dict[str, torch.Tensor], list[str]]:
    """Convert any diffusers-named LoRA (PEFT, ``save_lora_weights``, attention processors)."""
    groups: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    layouts: set[str] = set()
    leftover: list[str] = []
    alphas: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        for suffix, (role, layout) in _SUFFIXES.items():
            if key.endswith(suffix):
                stem = key[: -len(suffix)]
                if role == "alpha":
                    alphas[stem] = tensor
                else:
                    groups[_module_name(stem, layout)][role] = tensor
                    layouts.add(layout)
                break
        else:
            leftover.append(key)
    deltas: dict[str, LoraDelta] = {}
    for module, parts in groups.items():
        if set(parts) != {"up", "down"}:
            leftover.append(f"{module} (only {', '.join(parts)})")
            continue
        alpha_t = alphas.pop(module, None)
        if alpha_t is None:  # network alphas are keyed by the stem before renaming
            alpha_t = next((alphas.pop(s) for s in list(alphas) if _module_name(s, "attn_procs") == module), None)
        try:
            rank = int(parts["down"].shape[0])
            rslora = False
            if alpha_t is not None:
                alpha = float(alpha_t)
            else:
                peft_alpha, rslora = _peft_alpha(metadata, module)
                alpha = peft_alpha if peft_alpha is not None else float(rank)
            scale = alpha / math.sqrt(rank) if rslora else alpha / rank
            deltas[module] = LoraDelta(scale=scale, up=parts["up"], down=parts["down"])
        except MALFORMED_MODULE as exc:  # factors of the wrong shape or rank in the file
            leftover.append(f"{module} ({exc.__class__.__name__}: {exc})")
    leftover.extend(f"{stem}.alpha" for stem in alphas)
    label = "+".join(sorted(layouts)) or "diffusers"
    return label, deltas, {}, leftover
