"""Streaming merges equal naive in-memory merges bit for bit; layouts round-trip; the cache is reused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import merger.merge as merge_mod
from merger.families import get_family
from merger.merge import merge_checkpoints, merge_tensor, merged_checkpoint, read_recipe
from tests.fakes.zoo import TinyZoo, build_tiny_zoo

WEIGHTS = [0.6, -0.2, 0.5]


@pytest.fixture(scope="session")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> TinyZoo:
    return build_tiny_zoo(tmp_path_factory.getbasetemp() / "merger-tiny-zoo")


def _naive(zoo: TinyZoo, method: str, weights: list[float], density: float = 0.5, seed: int = 0):
    """Load everything, then merge each merged-component tensor in fp32."""
    family = get_family("sd15")
    base = load_file(zoo.base_file)
    experts = [load_file(p) for p in zoo.checkpoints[: len(weights)]]
    out = {}
    for key, value in base.items():
        if family.component_of(key) is None or not value.is_floating_point():
            out[key] = value
        elif method == "task_arithmetic":  # the formula written out, independent of merge_tensor
            acc = value.float().clone()
            for w, e in zip(weights, experts, strict=True):
                acc += w * (e[key].float() - value.float())
            out[key] = acc
        else:
            out[key] = merge_tensor(method, value.float(), [e[key].float() for e in experts], weights, density,
                                    seed, key)
    return out


# ties trims over whole tensors, so it is never sliced; the element-wise methods are, above a size
@pytest.mark.parametrize(
    ("method", "sliced"),
    [(m, False) for m in ("task_arithmetic", "weighted_average", "ties", "dare")]
    + [(m, True) for m in ("task_arithmetic", "weighted_average", "dare")],
)
def test_streaming_equals_naive_fp32(zoo: TinyZoo, tmp_path: Path, method: str, sliced: bool,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    if sliced:  # make the tiny zoo's tensors "large"
        monkeypatch.setattr(merge_mod, "_SLICE_ELEMENTS", 700)
    weights = [abs(w) for w in WEIGHTS] if method == "weighted_average" else WEIGHTS
    out = merge_checkpoints(zoo.base_file, list(zip(zoo.checkpoints, weights, strict=True)), method,
                            tmp_path / "m.safetensors", dtype="fp32", density=0.4, seed=5)
    got, want = load_file(out), _naive(zoo, method, weights, density=0.4, seed=5)
    assert set(got) == set(want)
    for key in want:
        assert got[key].dtype == want[key].dtype and torch.equal(got[key], want[key]), key
    base = load_file(zoo.base_file)
    assert not torch.equal(got["model.diffusion_model.out.2.weight"], base["model.diffusion_model.out.2.weight"])


def test_fp16_output_and_recipe(zoo: TinyZoo, tmp_path: Path) -> None:
    pairs = list(zip(zoo.checkpoints, WEIGHTS, strict=True))
    out = merge_checkpoints(zoo.base_file, pairs, "task_arithmetic", tmp_path / "m.safetensors", dtype="fp16")
    got, want = load_file(out), _naive(zoo, "task_arithmetic", WEIGHTS)
    assert all(torch.equal(got[k], want[k].half()) for k in want)
    recipe = read_recipe(out)
    assert recipe["method"] == "task_arithmetic" and recipe["dtype"] == "fp16"
    assert [e["weight"] for e in recipe["experts"]] == WEIGHTS
    assert recipe["experts"][0]["name"] == zoo.checkpoints[0].name


def test_diffusers_base_and_expert_layouts_agree(zoo: TinyZoo, tmp_path: Path) -> None:
    from diffusers import StableDiffusionPipeline

    pairs = list(zip(zoo.checkpoints[:2], WEIGHTS[:2], strict=True))
    single = merge_checkpoints(zoo.base_file, pairs, "ties", tmp_path / "single.safetensors", dtype="fp32")
    # a diffusers base written as one original-layout file gives the very same file contents
    from_dir = merge_checkpoints(zoo.base_dir, pairs, "ties", tmp_path / "fromdir.safetensors", dtype="fp32")
    a, b = load_file(single), load_file(from_dir)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    # diffusers dir out: a complete pipeline that loads strictly and matches the single file
    out_dir = merge_checkpoints(zoo.base_dir, pairs, "ties", tmp_path / "merged-dir", dtype="fp32")
    pipe = StableDiffusionPipeline.from_pretrained(out_dir)
    ref = StableDiffusionPipeline.from_single_file(str(single), config=str(zoo.base_dir), safety_checker=None,
                                                   requires_safety_checker=False)
    for component in ("unet", "vae", "text_encoder"):
        x, y = getattr(pipe, component).state_dict(), getattr(ref, component).state_dict()
        assert all(torch.equal(x[k], y[k]) for k in x), component
    assert json.loads((out_dir / "model_index.json").read_text())["_class_name"] == "StableDiffusionPipeline"
    # an expert in diffusers layout merges like the same expert as a single file
    expert_dir = merge_checkpoints(zoo.base_dir, [(zoo.checkpoints[0], 1.0)], "task_arithmetic",
                                   tmp_path / "expert-dir", dtype="fp32")
    via_dir = load_file(merge_checkpoints(zoo.base_file, [(expert_dir, 0.7)], "task_arithmetic",
                                          tmp_path / "via-dir.safetensors", dtype="fp32"))
    via_file = load_file(merge_checkpoints(zoo.base_file, [(zoo.checkpoints[0], 0.7)], "task_arithmetic",
                                           tmp_path / "via-file.safetensors", dtype="fp32"))
    assert all(torch.equal(via_dir[k], via_file[k]) for k in via_file)


def test_cache_reused_on_second_build(zoo: TinyZoo, settings, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = merge_mod.merge

    def counting(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(merge_mod, "merge", counting)
    experts = [(zoo.checkpoints[0], 0.5), (zoo.checkpoints[1], 0.25)]
    first = merged_checkpoint(settings, zoo.base_file, experts, "dare", dtype="fp16", density=0.5, seed=1)
    assert first.parent == settings.data_dir / "cache" / "merges" and first.suffix == ".safetensors"
    stamp = first.stat().st_mtime_ns
    second = merged_checkpoint(settings, zoo.base_file, experts, "dare", dtype="fp16", density=0.5, seed=1)
    assert second == first and second.stat().st_mtime_ns == stamp and len(calls) == 1
    other_seed = merged_checkpoint(settings, zoo.base_file, experts, "dare", dtype="fp16", density=0.5, seed=2)
    assert other_seed != first and len(calls) == 2
    recipe = read_recipe(first)
    assert recipe["base_sha256"] and len(recipe["expert_sha256"]) == 2 and recipe["seed"] == 1
    # a diffusers-dir base gives an original-layout file in the cache too
    from_dir = merged_checkpoint(settings, zoo.base_dir, experts, "task_arithmetic", dtype="fp32")
    assert "model.diffusion_model.conv_in.weight" not in load_file(from_dir)
    assert "model.diffusion_model.input_blocks.0.0.weight" in load_file(from_dir)


def test_allowed_pickle_expert_merges_like_its_safetensors_twin(zoo: TinyZoo, tmp_path: Path) -> None:
    from merger.errors import UnsafeFormat

    pickled = tmp_path / "expert.ckpt"
    torch.save({"state_dict": load_file(zoo.checkpoints[0])}, pickled)
    with pytest.raises(UnsafeFormat):
        merge_checkpoints(zoo.base_file, [(pickled, 0.5)], "task_arithmetic", tmp_path / "x.safetensors")
    a = merge_checkpoints(zoo.base_file, [(pickled, 0.5)], "task_arithmetic", tmp_path / "a.safetensors",
                          dtype="fp32", allow_pickle=True)
    b = merge_checkpoints(zoo.base_file, [(zoo.checkpoints[0], 0.5)], "task_arithmetic", tmp_path / "b.safetensors",
                          dtype="fp32")
    sa, sb = load_file(a), load_file(b)
    assert set(sa) == set(sb) and all(torch.equal(sa[k], sb[k]) for k in sb)


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "dare", "weighted_average"])
def test_fp16_inputs_accumulate_in_fp32(zoo: TinyZoo, tmp_path: Path, method: str,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Half-precision inputs (the usual download) merge exactly as their fp32 upcasts would."""
    from merger.merge_writer import write_safetensors

    files = []
    for path in [zoo.base_file, *zoo.checkpoints[:2]]:
        half = tmp_path / f"{path.stem}.fp16.safetensors"
        write_safetensors(half, {k: v.half() for k, v in load_file(path).items()})
        files.append(half)
    weights = [0.7, 0.4]
    monkeypatch.setattr(merge_mod, "_SLICE_ELEMENTS", 700)
    out = merge_checkpoints(files[0], list(zip(files[1:], weights, strict=True)), method, tmp_path / "m.safetensors",
                            dtype="fp32", density=0.6, seed=2)
    got = load_file(out)
    base, experts = load_file(files[0]), [load_file(p) for p in files[1:]]
    family = get_family("sd15")
    for key, value in base.items():
        if family.component_of(key) is None:
            assert torch.equal(got[key], value)
            continue
        want = merge_tensor(method, value.float(), [e[key].float() for e in experts], weights, 0.6, 2, key)
        assert got[key].dtype == torch.float32 and torch.equal(got[key], want), key


@pytest.mark.parametrize("base_attr", ["base_file", "base_dir"])
def test_one_checkpoint_at_full_weight_is_swapped_in_without_a_copy(zoo: TinyZoo, settings, base_attr: str) -> None:
    base = getattr(zoo, base_attr)
    expert = zoo.checkpoints[0]
    swapped = merged_checkpoint(settings, base, [(expert, 1.0)], "task_arithmetic", dtype="fp32")
    assert swapped == expert
    assert not (settings.data_dir / "cache" / "merges").exists()
    # the merge it stands for gives the expert's own tensors (up to fp32 rounding of θb + (θe − θb))
    merged = merge_mod.merge_checkpoints(zoo.base_file, [(expert, 1.0)], "task_arithmetic",
                                         settings.data_dir / "explicit.safetensors", "fp32")
    want, got = load_file(expert), load_file(merged)
    for key, tensor in want.items():
        if key in got:
            assert torch.allclose(got[key], tensor, atol=1e-5), key
    # any other weight still merges into the cache
    half = merged_checkpoint(settings, base, [(expert, 0.5)], "task_arithmetic", dtype="fp32")
    assert half.parent == settings.data_dir / "cache" / "merges"


def test_swap_in_still_rejects_an_incompatible_expert(zoo: TinyZoo, settings, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from merger.errors import IncompatibleExpert

    tensors = load_file(zoo.checkpoints[0])
    key = next(k for k in sorted(tensors) if k.startswith("model.diffusion_model.") and tensors[k].ndim == 4)
    tensors[key] = torch.zeros(3, 3, 3, 3)
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad))
    with pytest.raises(IncompatibleExpert, match="bad.safetensors"):
        merged_checkpoint(settings, zoo.base_file, [(bad, 1.0)], "task_arithmetic", dtype="fp32")
