"""cloneofsimo ``lora_diffusion`` files: ``unet:<i>:up|down``, ``text_encoder:<i>:up|down``, target lists in
the metadata (``"unet": '["CrossAttention", "Attention", "GEGLU"]'``), optional learned token embeddings.

The file names no modules: entry ``i`` is the i-th ``nn.Linear`` that lora_diffusion found by walking
``model.modules()`` for ancestors whose class is in the target list. That order is reconstructed for
SD1.5 under every module order diffusers has had (BasicTransformerBlock ``attn1, ff, attn2`` in early
releases, ``attn1, attn2, ff`` later; ``mid_block`` registered after or before ``up_blocks``) and each
candidate is checked against the shape of every entry. Exactly one consistent mapping is accepted; none or
several distinct ones are refused — the mapping is never guessed.
"""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Mapping

import torch

from merger.lora.deltas import LoraDelta

_KEY = re.compile(r"^(unet|text_encoder):(\d+):(up|down)$")
SENTINEL = _KEY

_ATTN = ("to_q", "to_k", "to_v", "to_out.0")  # diffusers (Cross)Attention children, registration order
_CLIP_ATTN = ("k_proj", "v_proj", "q_proj", "out_proj")  # transformers CLIPAttention registration order
_SD15_CROSS = 768
_SD15_TE_WIDTH, _SD15_TE_LAYERS = 768, 12
_DOWN = [("down_blocks.0", 320, 2), ("down_blocks.1", 640, 2), ("down_blocks.2", 1280, 2)]
_UP = [("up_blocks.1", 1280, 3), ("up_blocks.2", 640, 3), ("up_blocks.3", 320, 3)]
_MID = [("mid_block", 1280, 1)]
_UNET_TARGETS = {"CrossAttention", "Attention", "GEGLU"}
_TE_TARGETS = {"CLIPAttention", "CLIPMLP"}


class UnmappableCloneofsimo(ValueError):
    """The entries of a lora_diffusion file cannot be tied to SD1.5 modules with certainty."""


def _unet_candidates(targets: set[str]) -> list[list[tuple[str, tuple[int, int]]]]:
    """Every plausible (module name, (out, in)) sequence lora_diffusion could have produced for SD1.5."""
    attn = bool(targets & {"CrossAttention", "Attention"})
    geglu = "GEGLU" in targets
    out: list[list[tuple[str, tuple[int, int]]]] = []
    for block_order, sequence in itertools.product((("attn1", "ff", "attn2"), ("attn1", "attn2", "ff")),
                                                   (_DOWN + _UP + _MID, _DOWN + _MID + _UP)):
        entries: list[tuple[str, tuple[int, int]]] = []
        for block, width, n in sequence:
            for a in range(n):
                base = f"unet.{block}.attentions.{a}.transformer_blocks.0"
                for part in block_order:
                    if part == "ff" and geglu:
                        entries.append((f"{base}.ff.net.0.proj", (8 * width, width)))
                    elif part in ("attn1", "attn2") and attn:
                        ctx = _SD15_CROSS if part == "attn2" else width
                        for child in _ATTN:
                            fan_in = ctx if child in ("to_k", "to_v") else width
                            entries.append((f"{base}.{part}.{child}", (width, fan_in)))
        out.append(entries)
    return out


def _te_candidates(targets: set[str]) -> list[list[tuple[str, tuple[int, int]]]]:
    w = _SD15_TE_WIDTH
    entries: list[tuple[str, tuple[int, int]]] = []
    for layer in range(_SD15_TE_LAYERS):
        base = f"text_encoder.text_model.encoder.layers.{layer}"
        if "CLIPAttention" in targets:
            entries += [(f"{base}.self_attn.{c}", (w, w)) for c in _CLIP_ATTN]
        if "CLIPMLP" in targets:
            entries += [(f"{base}.mlp.fc1", (4 * w, w)), (f"{base}.mlp.fc2", (w, 4 * w))]
    return [entries]


def _targets(metadata: Mapping[str, str], component: str, allowed: set[str]) -> set[str]:
    raw = metadata.get(component)
    if raw is None:
        raise UnmappableCloneofsimo(f"no '{component}' target-module list in the metadata")
    try:
        targets = set(json.loads(raw))
    except (json.JSONDecodeError, TypeError):
        raise UnmappableCloneofsimo(f"unreadable '{component}' target list {raw[:80]!r}") from None
    if not targets or not targets <= allowed:
        raise UnmappableCloneofsimo(f"{component} targets {sorted(targets)} are outside {sorted(allowed)}")
    return targets


def _map(component: str, pairs: dict[int, dict[str, torch.Tensor]],
         candidates: list[list[tuple[str, tuple[int, int]]]]) -> list[str]:
    n = len(pairs)
    if sorted(pairs) != list(range(n)) or any(set(p) != {"up", "down"} for p in pairs.values()):
        raise UnmappableCloneofsimo(f"{component} entries are not a complete 0..{n - 1} up/down sequence")
    shapes = [(int(pairs[i]["up"].shape[0]), int(pairs[i]["down"].shape[1])) for i in range(n)]
    fits = {tuple(name for name, _ in c) for c in candidates
            if len(c) == n and all(s == e for s, (_, e) in zip(shapes, c, strict=True))}
    if len(fits) == 1:
        return list(next(iter(fits)))
    if not fits:
        raise UnmappableCloneofsimo(f"its {n} {component} entries match no SD1.5 module order of lora_diffusion")
    raise UnmappableCloneofsimo(f"its {n} {component} entries fit several module orders (ambiguous)")


def convert_cloneofsimo_to_diffusers(
    state_dict: Mapping[str, torch.Tensor], metadata: Mapping[str, str]
) -> tuple[str, dict[str, LoraDelta], dict[str, torch.Tensor], list[str]]:
    """Convert a lora_diffusion file for SD1.5.

    Raises:
        UnmappableCloneofsimo: the entries cannot be tied to modules with certainty.
    """
    pairs: dict[str, dict[int, dict[str, torch.Tensor]]] = {"unet": {}, "text_encoder": {}}
    embeddings: dict[str, torch.Tensor] = {}
    leftover: list[str] = []
    for key, tensor in state_dict.items():
        match = _KEY.match(key)
        if match:
            component, index, role = match.group(1), int(match.group(2)), match.group(3)
            pairs[component].setdefault(index, {})[role] = tensor
        elif metadata.get(key) == "<embed>" and tensor.dim() == 1:
            embeddings[key] = tensor
        else:
            leftover.append(key)
    deltas: dict[str, LoraDelta] = {}
    for component, allowed, build in (("unet", _UNET_TARGETS, _unet_candidates),
                                      ("text_encoder", _TE_TARGETS, _te_candidates)):
        if not pairs[component]:
            continue
        names = _map(component, pairs[component], build(_targets(metadata, component, allowed)))
        for index, name in enumerate(names):
            down, up = pairs[component][index]["down"], pairs[component][index]["up"]
            # lora_diffusion applies up(down(x)) * scale with scale 1.0 by default: no alpha.
            deltas[name] = LoraDelta(scale=1.0, up=up, down=down)
    return "cloneofsimo", deltas, embeddings, leftover
