"""LyCORIS LoHa (Hadamard product of two low-rank products), kohya module naming.

ΔW = (w1a @ w1b) ⊙ (w2a @ w2b) · alpha / r with ``r = hada_w1_b.shape[0]``; convolutions either store the
kernel flattened in ``w*_b`` or use Tucker cores ``hada_t1``/``hada_t2`` with ``w*_a (r, out)``, ``w*_b (r, in)``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from functools import partial

import torch

from merger.lora.deltas import LoraDelta
from merger.lora.formats.tucker import rebuild_tucker

SUFFIXES = frozenset({"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2", "alpha"})
SENTINEL = "hada_w1_a"


def loha_weight(parts: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The unscaled float32 ``(w1a @ w1b) ⊙ (w2a @ w2b)`` (Tucker-rebuilt when ``hada_t1/t2`` are present)."""
    w1a, w1b, w2a, w2b = (parts[k] for k in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"))
    if "hada_t1" in parts:
        return rebuild_tucker(parts["hada_t1"], w1a, w1b) * rebuild_tucker(parts["hada_t2"], w2a, w2b)
    return (w1a.float() @ w1b.float().flatten(1)) * (w2a.float() @ w2b.float().flatten(1))


def convert_loha_module(parts: Mapping[str, torch.Tensor]) -> LoraDelta:
    """One module's LoHa tensors (keyed by suffix) → a :class:`LoraDelta` built on demand."""
    w1a, w1b, w2a, w2b = (parts[k] for k in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"))
    if ("hada_t1" in parts) != ("hada_t2" in parts):
        raise ValueError("hada_t1 and hada_t2 come together")
    if "hada_t1" in parts:
        t1, t2 = parts["hada_t1"], parts["hada_t2"]
        shape = (int(w1a.shape[1]), int(w1b.shape[1]), *t1.shape[2:])
        shape2 = (int(w2a.shape[1]), int(w2b.shape[1]), *t2.shape[2:])
    else:
        shape = (int(w1a.shape[0]), math.prod(w1b.shape[1:]))
        shape2 = (int(w2a.shape[0]), math.prod(w2b.shape[1:]))
        if w1a.shape[1] != w1b.shape[0] or w2a.shape[1] != w2b.shape[0]:
            raise ValueError("LoHa factor ranks differ")
    if shape != shape2:
        raise ValueError(f"LoHa halves have shapes {shape} and {shape2}")
    rank = int(w1b.shape[0])
    alpha = float(parts["alpha"]) if "alpha" in parts else float(rank)
    return LoraDelta(scale=alpha / rank, full_shape=shape, build=partial(loha_weight, dict(parts)))
