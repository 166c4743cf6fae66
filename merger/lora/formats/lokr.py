"""LyCORIS LoKr (Kronecker product), kohya module naming.

ΔW = kron(w1, w2) · scale where ``w1 = lokr_w1`` or ``lokr_w1_a @ lokr_w1_b`` and ``w2 = lokr_w2``,
``lokr_w2_a @ lokr_w2_b`` or a Tucker rebuild with ``lokr_t2``. ``scale = alpha / r`` with ``r`` the
factorised rank (``lokr_w1_b.shape[0]``, else ``lokr_w2_b.shape[0]``); when both factors are stored full the
scale is 1 (alpha is ignored, as in LyCORIS and A1111). A 2-D product for a convolution is the kernel
flattened to ``(out, in·kh·kw)`` and is reshaped when applied.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial

import torch

from merger.errors import CorruptWeights
from merger.lora.deltas import LoraDelta
from merger.lora.formats.tucker import rebuild_tucker

SUFFIXES = frozenset({"lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2", "alpha"})
SENTINELS = ("lokr_w1", "lokr_w1_a")


def _w1(parts: Mapping[str, torch.Tensor]) -> torch.Tensor:
    if "lokr_w1" in parts:
        return parts["lokr_w1"].float()
    return parts["lokr_w1_a"].float() @ parts["lokr_w1_b"].float()


def _w2(parts: Mapping[str, torch.Tensor]) -> torch.Tensor:
    if "lokr_w2" in parts:
        return parts["lokr_w2"].float()
    w2a, w2b = parts["lokr_w2_a"], parts["lokr_w2_b"]
    if "lokr_t2" in parts:
        return rebuild_tucker(parts["lokr_t2"], w2a, w2b)
    return (w2a.float() @ w2b.float().flatten(1)).reshape(w2a.shape[0], *w2b.shape[1:])


def lokr_weight(parts: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The unscaled float32 ``kron(w1, w2)`` (``w1`` gets trailing unit dims to match a conv ``w2``)."""
    w1, w2 = _w1(parts), _w2(parts)
    for _ in range(w2.dim() - w1.dim()):
        w1 = w1.unsqueeze(-1)
    return torch.kron(w1, w2.contiguous())


def _shape(parts: Mapping[str, torch.Tensor], name: str) -> tuple[int, ...]:
    """Shape of factor ``w1``/``w2`` without computing it."""
    if name in parts:
        return tuple(int(d) for d in parts[name].shape)
    a, b = parts[f"{name}_a"], parts[f"{name}_b"]
    if name == "lokr_w2" and "lokr_t2" in parts:
        return (int(a.shape[1]), int(b.shape[1]), *parts["lokr_t2"].shape[2:])
    if a.shape[1] != b.shape[0]:
        raise ValueError(f"{name}_a {tuple(a.shape)} and {name}_b {tuple(b.shape)} do not chain")
    return (int(a.shape[0]), *(int(d) for d in b.shape[1:]))


def convert_lokr_module(parts: Mapping[str, torch.Tensor]) -> LoraDelta:
    """One module's LoKr tensors (keyed by suffix) → a :class:`LoraDelta` built on demand."""
    s1, s2 = _shape(parts, "lokr_w1"), _shape(parts, "lokr_w2")
    if len(s1) > len(s2):  # kron(w1, w2) of a weight: w1 never has more dimensions than w2
        raise CorruptWeights(f"LoKr factors of shapes {s1} and {s2} do not form a weight")
    s1 = s1 + (1,) * (len(s2) - len(s1))
    shape = tuple(a * b for a, b in zip(s1, s2, strict=False)) + s2[len(s1):]
    if "lokr_w1_b" in parts:
        rank: int | None = int(parts["lokr_w1_b"].shape[0])
    elif "lokr_w2_b" in parts:
        rank = int(parts["lokr_w2_b"].shape[0])
    else:
        rank = None
    alpha = float(parts["alpha"]) if "alpha" in parts else None
    scale = alpha / rank if (rank is not None and alpha is not None) else 1.0
    return LoraDelta(scale=scale, full_shape=shape, build=partial(lokr_weight, dict(parts)))
