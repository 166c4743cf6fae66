"""Where the shipped world lives (inside the package, so ``make demo`` and the tests never train)."""

from __future__ import annotations

import os
from pathlib import Path

BASE_NAME = "sd15-world"


def shipped_dir() -> Path:
    """The package's weights folder (``DIFFGRAPH_WORLD_DIR`` points elsewhere, e.g. at a fresh ``world build``)."""
    override = os.environ.get("DIFFGRAPH_WORLD_DIR", "")
    return Path(override).expanduser() if override else Path(__file__).resolve().parent / "weights"


def base_model_path() -> Path:
    """The base model as one original-layout ``.safetensors`` file; its diffusers configs and tokenizer are the
    sibling folder of the same stem (what ``merger.diffusers_pipeline.resolve_base`` looks for)."""
    return shipped_dir() / f"{BASE_NAME}.safetensors"


def reader_path() -> Path:
    return shipped_dir() / "reader.safetensors"


def clip_dir() -> Path:
    return shipped_dir() / "clip"


def manifest_path() -> Path:
    return shipped_dir() / "world.json"
