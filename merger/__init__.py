"""Building the weighted model: safe loading of base models, checkpoints and LoRAs in every common layout,
streaming checkpoint merges, weighted LoRA fusion, a pipeline cache, and sampling."""

from typing import Any as _Any


def __getattr__(name: str) -> _Any:
    # Lazy so that importing ``merger`` (e.g. for ``diffgraph --help``) does not import torch/diffusers.
    if name in ("Generator", "GenerationResult"):
        from merger import generate

        return getattr(generate, name)
    raise AttributeError(f"module 'merger' has no attribute {name!r}")
