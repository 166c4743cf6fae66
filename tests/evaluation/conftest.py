"""A small calibrated graph of the tiny zoo's experts, for evaluation tests."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from core.settings import Settings, get_settings
from core.types import ExpertKind
from tests.calibration.conftest import local_expert
from tests.local_files import import_local_files

SKILLS = [
    ("checkpoints", 0, "Anime Illustration Mix", "anime characters, colourful illustration, cel shading"),
    ("checkpoints", 1, "Photoreal Portrait", "photorealistic portraits of people, cinematic lighting"),
    ("checkpoints", 2, "Fantasy Landscapes", "fantasy landscapes, castles, misty mountains, painterly"),
    ("loras_kohya", 0, "Soft Watercolor", "watercolor painting style, soft colors, paper texture"),
    ("loras_kohya", 1, "Neon Cyberpunk", "neon cyberpunk city at night, glowing lights"),
]
PROMPTS = [
    "an anime girl with red hair, soft watercolor painting",
    "a portrait of an old man in a neon cyberpunk city at night, watercolor",
]


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Tiny models run faster on one intra-op thread on a busy 2-core box."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)




@pytest.fixture
def eval_settings(settings: Settings, tiny_zoo, tiny_clip, embedder, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """The zoo's experts registered with skills and embeddings (not calibrated: ESA needs no calibration)."""
    from graphdb.backends import store_session

    env = {
        "DIFFGRAPH_BASE_MODELS": json.dumps({"sd15": str(tiny_zoo.base_dir)}),
        "DIFFGRAPH_SCORER_PATHS": json.dumps(tiny_clip),
        "DIFFGRAPH_CALIB_STEPS": "2", "DIFFGRAPH_CALIB_SIZE": "32", "DIFFGRAPH_CALIB_PROMPTS": "4",
        "DIFFGRAPH_DEVICE": "cpu", "DIFFGRAPH_DTYPE": "fp32",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    get_settings.cache_clear()
    s = get_settings()
    experts = []
    for attr, i, name, skill in SKILLS:
        path: Path = getattr(tiny_zoo, attr)[i]
        kind = ExpertKind.checkpoint if attr == "checkpoints" else ExpertKind.lora
        e = local_expert(path, name, kind, recommended_weight=0.8 if kind == ExpertKind.lora else None)
        vec = [float(v) for v in embedder.encode([f"{name}: {skill}"])[0]]
        experts.append(e.model_copy(update={"skill": skill, "tags": skill.split(", "), "embedding": vec}))
    with store_session(s) as store:
        store.upsert_experts(experts)
    import_local_files(s, experts)
    return s


@pytest.fixture
def prompt_file(tmp_path: Path) -> Path:
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n", encoding="utf-8")
    return path
