"""Fixtures for calibration tests: the tiny zoo, a tiny CLIP scorer, and settings wired to both."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import pytest

from core.settings import Settings, get_settings
from core.types import Expert, ExpertFile, ExpertKind
from tests.local_files import import_local_files


def calib_env(zoo, clip: dict[str, str], prompts: int = 3) -> dict[str, str]:
    """The DIFFGRAPH_* variables of a tiny calibration setup (also used for worker subprocesses)."""
    return {
        "DIFFGRAPH_BASE_MODELS": json.dumps({"sd15": str(zoo.base_dir)}),
        "DIFFGRAPH_SCORER_PATHS": json.dumps(clip),
        "DIFFGRAPH_CALIB_STEPS": "2",
        "DIFFGRAPH_CALIB_SIZE": "32",
        "DIFFGRAPH_CALIB_SEEDS": "1",
        "DIFFGRAPH_CALIB_PROMPTS": str(prompts),
        "DIFFGRAPH_DEVICE": "cpu",
    }


@pytest.fixture
def calib_settings(settings: Settings, tiny_zoo, tiny_clip, monkeypatch: pytest.MonkeyPatch) -> Settings:
    for key, value in calib_env(tiny_zoo, tiny_clip).items():
        monkeypatch.setenv(key, value)
    get_settings.cache_clear()
    return get_settings()


def local_expert(path: Path, name: str, kind: ExpertKind = ExpertKind.checkpoint,
                 recommended_weight: float | None = None) -> Expert:
    """An expert registered from a local file (``source="local"``, ``file://`` URL, real SHA-256)."""
    data = path.read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    return Expert(
        id=f"local:{sha[:16]}", source="local", name=name, kind=kind, base_model="SD 1.5", base_family="sd15",
        recommended_weight=recommended_weight, skill=f"tiny test expert {name}",
        files=[ExpertFile(name=path.name, url=path.resolve().as_uri(), sha256=sha, size_bytes=len(data))],
    )



@pytest.fixture
def register() -> Callable[[Settings, list[Expert]], None]:
    def _register(settings: Settings, experts: list[Expert]) -> None:
        from graphdb.store import store_session

        with store_session(settings) as store:
            store.upsert_experts(experts)
        import_local_files(settings, experts)

    return _register


@pytest.fixture
def corrupt_checkpoint(tiny_zoo, tmp_path: Path) -> Path:
    """A checkpoint truncated to half its size (valid header length field, missing tensor data)."""
    src = tiny_zoo.checkpoints[2].read_bytes()
    path = tmp_path / "corrupt-expert.safetensors"
    path.write_bytes(src[: len(src) // 2])
    return path
