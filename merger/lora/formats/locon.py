"""Kohya / LyCORIS LoCon modules: ``lora_down``/``lora_up``/``alpha``, linear or conv, optional Tucker ``lora_mid``.

ΔW = up @ down · alpha / r with ``r = lora_down.shape[0]`` (alpha missing means alpha = r). Convolution
weights keep their 4-D layout (``down (r, in, kh, kw)``, ``up (out, r, 1, 1)``); a ``lora_mid`` core is
rebuilt into a full kernel.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial

import torch

from merger.lora.deltas import LoraDelta
from merger.lora.formats.tucker import rebuild_tucker_from_conv

SUFFIXES = frozenset({"lora_down.weight", "lora_up.weight", "lora_mid.weight", "alpha"})
SENTINEL = "lora_down.weight"


def convert_locon_module(parts: Mapping[str, torch.Tensor]) -> LoraDelta:
    """One module's kohya/LoCon tensors (keyed by suffix) → a :class:`LoraDelta`."""
    down, up = parts["lora_down.weight"], parts["lora_up.weight"]
    rank = int(down.shape[0])
    alpha = float(parts["alpha"]) if "alpha" in parts else float(rank)
    if "lora_mid.weight" in parts:
        mid = parts["lora_mid.weight"]
        shape = (int(up.shape[0]), int(down.shape[1]), *(int(d) for d in mid.shape[2:]))
        return LoraDelta(scale=alpha / rank, full_shape=shape, build=partial(rebuild_tucker_from_conv, up, down, mid))
    return LoraDelta(scale=alpha / rank, up=up, down=down)
