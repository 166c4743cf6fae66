"""The DiffGraph mini world: a miniature text-to-image world trained on two CPU cores.

A procedural image grammar (shape, colour, background, style) with known ground truth; a Stable Diffusion
1.5-architecture base model (diffusers ``UNet2DConditionModel``, ``AutoencoderKL``, ``CLIPTextModel``) trained
on it with some concepts deliberately rare; checkpoint and LoRA experts fine-tuned from the base on those
rare concepts; an attribute reader and a CLIP model as scorers; Civitai-format homepages for every expert.
The trained weights ship in ``world/weights`` (``diffgraph world build`` retrains them, ``world check``
measures them).
"""

from __future__ import annotations

from typing import Any


def experts_manifest() -> list[dict[str, Any]]:
    """The shipped experts: name, kind (checkpoint|lora), file (absolute path), layout, speciality
    (attribute → values), trained words. Read from ``world.json`` of the shipped folder."""
    from world import paths
    from world.integrity import manifest

    data = manifest()
    out = []
    for e in data.get("experts", []):
        out.append({**e, "file": str(paths.shipped_dir() / e["file"])})
    return out


__all__ = ["experts_manifest"]
