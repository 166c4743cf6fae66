"""Helpers for crawler tests: the real-format fixtures and tiny safetensors weight files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
CIVITAI = FIXTURES / "civitai"
HF = FIXTURES / "huggingface"


def civitai_items() -> list[dict]:
    """The 30 real ``/api/v1/models`` items (20 LoRA + 10 Checkpoint, 2023)."""
    items = []
    for name in ("LORA_normal_top80_smallest20.jsonl", "Checkpoint_normal_top40_smallest10.jsonl"):
        items += [json.loads(line) for line in (CIVITAI / name).read_text(encoding="utf-8").splitlines()]
    return items


def load_json(name: str) -> dict:
    return json.loads((CIVITAI / name).read_text(encoding="utf-8"))


def tiny_safetensors(path: Path, seed: int = 0) -> Path:
    """A few-KB safetensors file (a LoRA-like pair of tensors), different for each seed."""
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(
        {"lora_unet_down.lora_down.weight": rng.standard_normal((4, 32)).astype(np.float32),
         "lora_unet_down.lora_up.weight": rng.standard_normal((32, 4)).astype(np.float32)},
        str(path),
        metadata={"format": "pt"},
    )
    return path


@pytest.fixture
def weights(tmp_path: Path):
    def make(name: str, seed: int = 0) -> Path:
        return tiny_safetensors(tmp_path / "weights" / name, seed)

    return make
