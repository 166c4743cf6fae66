"""The shipped world's files load through the project's merger and through diffusers, and its scorers read
ground-truth renders correctly (no training here: the weights ship in ``world/weights``)."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import pytest

from world import experts_manifest, grammar, paths

pytestmark = pytest.mark.skipif(not paths.manifest_path().is_file(), reason="no shipped world")


def test_every_shipped_file_matches_its_hash() -> None:
    from world.integrity import verify_all

    assert len(verify_all()) >= 15


def test_checkpoints_open_and_merge_with_the_project_merger(tmp_path: Path, settings) -> None:
    from merger.merge import merge_checkpoints
    from merger.model_source import align, open_source

    ckpts = [Path(e["file"]) for e in experts_manifest() if e["kind"] == "checkpoint"]
    assert len(ckpts) >= 6
    with open_source(paths.base_model_path()) as base:
        assert base.family.name == "sd15"
        unet_keys = [k for k in base.native_keys() if k.startswith("model.diffusion_model.")]
        for f in ckpts:  # UNet-only (pruned) files: the family comes from the base, as in a merge
            with open_source(f, family="sd15") as expert:
                assert set(unet_keys) <= set(align(base, expert)), f.name
    out = tmp_path / "merged.safetensors"
    merge_checkpoints(paths.base_model_path(), [(ckpts[0], 0.5), (ckpts[1], 0.5)], "task_arithmetic", out)
    with open_source(out) as merged:
        assert merged.family.name == "sd15"


def test_loras_load_in_both_the_merger_and_diffusers() -> None:
    from merger.lora.load import load_lora
    from world.check import load_base

    pipe = load_base()
    loras = [e for e in experts_manifest() if e["kind"] == "lora"]
    assert {e["layout"] for e in loras} == {"kohya", "diffusers"} and len(loras) >= 6
    for e in loras:
        deltas = load_lora(e["file"])
        assert deltas.deltas, e["name"]
        f = Path(e["file"])
        pipe.load_lora_weights(str(f.parent), weight_name=f.name, adapter_name=e["name"].replace("-", "_"))
    assert len(pipe.get_list_adapters()["unet"]) == len(loras)


def test_reader_reads_ground_truth_renders() -> None:
    from world.scorers import adherence, read

    rng = random.Random(11)
    specs = [grammar.sample_spec(rng) for _ in range(40)]
    images = [grammar.render(s) for s in specs]
    seen = read(images)
    correct = sum(s.attrs() == r for s, r in zip(specs, seen, strict=True))
    assert correct >= 34  # ≥ 0.95 per attribute measured by `world check`; whole-image agreement here
    prompts = [grammar.full_prompt(s, rng) for s in specs]
    assert sum(adherence(images, prompts)) / len(images) >= 0.9
    wrong = [grammar.prompt_for({**s.attrs(), "shape": next(v for v in grammar.SHAPES if v != s.shape)}, rng)
             for s in specs]
    assert sum(adherence(images, wrong)) / len(images) <= 0.85


def test_clip_prefers_the_matching_prompt() -> None:
    from world.scorers import clip_score

    rng = random.Random(12)
    specs = [grammar.sample_spec(rng) for _ in range(16)]
    images = [grammar.render(s) for s in specs]
    right = clip_score(images, [grammar.full_prompt(s, rng) for s in specs])
    shuffled = clip_score(images, [grammar.full_prompt(specs[(i + 5) % 16], rng) for i in range(16)])
    assert sum(r > w for r, w in zip(right, shuffled, strict=True)) >= 13


def test_corrupted_shipped_file_is_named(tmp_path: Path, monkeypatch) -> None:
    from world import integrity, scorers
    from world.integrity import WorldError

    copy = tmp_path / "world"
    shutil.copytree(paths.shipped_dir(), copy, ignore=shutil.ignore_patterns(".work"))
    monkeypatch.setenv("DIFFGRAPH_WORLD_DIR", str(copy))
    integrity._verified.cache_clear()
    scorers._reader.cache_clear()
    data = bytearray((copy / "reader.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (copy / "reader.safetensors").write_bytes(bytes(data))
    with pytest.raises(WorldError, match="reader.safetensors"):
        scorers.read([grammar.render(grammar.Spec("circle", "red", "plain white", "flat"))])
    (copy / "reader.safetensors").unlink()
    with pytest.raises(WorldError, match="missing: .*reader.safetensors"):
        integrity.verify_all()
    integrity._verified.cache_clear()
    scorers._reader.cache_clear()


def test_world_scorers_are_in_the_calibration_registry(tmp_path: Path) -> None:
    from calibration.scorers import Unavailable, available_scorers
    from core.settings import Settings

    shipped = str(paths.shipped_dir())
    settings = Settings(data_dir=tmp_path, device="cpu",
                        scorer_paths={"world-adherence": shipped, "world-clip": shipped})
    scorers = available_scorers(settings)
    adh, clip = scorers["world-adherence"], scorers["world-clip"]
    assert not isinstance(adh, Unavailable) and not isinstance(clip, Unavailable)
    img = grammar.render(grammar.Spec("star", "blue", "striped", "flat"))
    assert adh.score([img], ["a blue star on a striped background"]) == [1.0]
    assert adh.version.startswith("world-adherence:")
    other = available_scorers(Settings(data_dir=tmp_path, scorer_paths={"world-clip": str(tmp_path)}))
    assert isinstance(other["world-clip"], Unavailable) and "not the active world" in other["world-clip"].reason
