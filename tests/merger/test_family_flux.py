"""FLUX.1 end to end on a tiny random FLUX-architecture pipeline: the hand-written BFL ↔ diffusers mapping
against diffusers' own single-file converter (full-width probe tensors), streaming merges across layouts,
sharded and fp8 inputs, kohya / XLabs / ai-toolkit LoRAs against diffusers' ``load_lora_weights`` +
``fuse_lora``, and one sampling step per FLUX family."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from merger.checkpoint_layout import flux_segments, original_from_segments
from merger.lora import fuse_loras, load_lora
from merger.merge import merge_checkpoints
from merger.merge_writer import write_safetensors
from merger.model_source import open_source
from tests.fakes.families import build_tiny_flux_pipeline, write_original_file


def test_hand_mapping_matches_diffusers_converter_at_full_width() -> None:
    # Full FLUX.1 row counts (3072 wide, mlp 12288) with 2 columns: the mapping only moves rows.
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    segs = flux_segments("", 2, 2, 3072, 12288, guidance=True)
    shapes: dict[str, int] = {}
    for seg in segs:
        end = max(r[1] for r in (seg.orig_rows, seg.diff_rows) if r is not None) if (seg.orig_rows or seg.diff_rows) else 0
        shapes[seg.original] = max(shapes.get(seg.original, 0), end)
    rows = {"img_in": 3072, "txt_in": 3072, "norm": 128, "mod.lin": 3072 * 6, "modulation.lin": 3072 * 3,
            "mlp.0": 12288, "mlp.2": 3072, "proj": 3072, "linear2": 3072, "final_layer.linear": 64}
    gen = torch.Generator().manual_seed(0)
    original = {}
    for name in {s.original for s in segs}:
        n = shapes[name] or next((v for k, v in rows.items() if k in name), 3072)
        cols = () if name.endswith(("bias", "scale")) else (2,)
        original[name] = torch.randn((n, *cols), generator=gen)
    theirs = convert_flux_transformer_checkpoint_to_diffusers(dict(original))
    diffusers_keys = {(s.component, s.key) for s in segs}
    assert {k for _, k in diffusers_keys} == set(theirs)
    # our inverse rebuilds the original from diffusers' result exactly
    ours = original_from_segments(segs, {("transformer", k): v for k, v in theirs.items()})
    assert set(ours) == set(original)
    for name, tensor in original.items():
        assert torch.equal(ours[name], tensor), name


@pytest.fixture(scope="module")
def flux(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("flux")
    pipe = build_tiny_flux_pipeline(root / "tok", seed=0)
    pipe.save_pretrained(root / "base", safe_serialization=True)
    torch.manual_seed(7)
    with torch.no_grad():
        for p in pipe.transformer.parameters():
            p.add_(0.05 * torch.randn_like(p))
    pipe.save_pretrained(root / "expert", safe_serialization=True)
    # a bare BFL transformer file (flux1-dev.safetensors layout), and the same stored as fp8
    write_original_file(pipe, root / "expert.safetensors", prefixes={"transformer": ""})
    write_original_file(pipe, root / "expert-fp8.safetensors", prefixes={"transformer": ""},
                        dtype=torch.float8_e4m3fn)
    return {"root": root, "base_dir": root / "base", "expert_dir": root / "expert",
            "expert_file": root / "expert.safetensors", "expert_fp8": root / "expert-fp8.safetensors"}


def _transformer(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    folder = path / "transformer"
    files = sorted(folder.glob("*.safetensors"))
    out: dict[str, torch.Tensor] = {}
    for f in files:
        out.update({k: v.float() for k, v in load_file(str(f)).items()})
    return out


@pytest.mark.parametrize("expert_key,atol", [("expert_dir", 1e-6), ("expert_file", 1e-6), ("expert_fp8", 0.2)])
def test_transformer_merge_across_layouts(flux: dict, tmp_path: Path, expert_key: str, atol: float) -> None:
    out = merge_checkpoints(flux["base_dir"], [(flux[expert_key], 0.5)], "task_arithmetic", tmp_path / "m",
                            dtype="fp32")
    base, expert, merged = _transformer(flux["base_dir"]), _transformer(flux["expert_dir"]), _transformer(out)
    assert set(merged) == set(base)
    for key in base:
        want = base[key] + 0.5 * (expert[key] - base[key])
        assert torch.allclose(merged[key], want, atol=atol), key


def test_sharded_transformer_reads(flux: dict, tmp_path: Path) -> None:
    from diffusers import FluxTransformer2DModel

    sharded = tmp_path / "sharded"
    import shutil

    shutil.copytree(flux["base_dir"], sharded)
    model = FluxTransformer2DModel.from_pretrained(str(flux["base_dir"]), subfolder="transformer")
    shutil.rmtree(sharded / "transformer")
    model.save_pretrained(str(sharded / "transformer"), max_shard_size="20KB")
    assert len(list((sharded / "transformer").glob("*.safetensors"))) > 1
    with open_source(sharded) as src:
        assert src.family.name == "flux" and len(src.files["transformer"].keys()) == len(model.state_dict())
    out = merge_checkpoints(sharded, [(flux["expert_file"], 1.0)], "task_arithmetic", tmp_path / "m", dtype="fp32")
    expert = _transformer(flux["expert_dir"])
    merged = _transformer(out)
    assert all(torch.allclose(merged[k], expert[k], atol=1e-6) for k in expert)


def _kohya_flux_lora(pipe, seed: int = 0) -> dict[str, torch.Tensor]:
    """sd-scripts FLUX names (fused img/txt qkv), with alpha. Single-block ``linear1`` is left out: diffusers'
    converter splits it at the full width (3072) only, which a tiny model does not have."""
    gen = torch.Generator().manual_seed(seed)
    t = pipe.transformer
    inner = t.config.num_attention_heads * t.config.attention_head_dim
    mlp = t.single_transformer_blocks[0].proj_mlp.out_features
    shapes = {"lora_unet_double_blocks_0_img_attn_qkv": (3 * inner, inner),
              "lora_unet_double_blocks_0_txt_attn_qkv": (3 * inner, inner),
              "lora_unet_double_blocks_0_img_attn_proj": (inner, inner),
              "lora_unet_double_blocks_0_img_mlp_0": (mlp, inner),
              "lora_unet_single_blocks_0_linear2": (inner, inner + mlp)}
    out = {}
    for name, (o, i) in shapes.items():
        out[f"{name}.lora_down.weight"] = torch.randn((4, i), generator=gen) * 0.3
        out[f"{name}.lora_up.weight"] = torch.randn((o, 4), generator=gen) * 0.3
        out[f"{name}.alpha"] = torch.tensor(2.0)
    return out


def _fused_by_diffusers(base_dir: Path, folder: Path, weight_name: str) -> dict[str, torch.Tensor]:
    from diffusers import FluxPipeline

    ref = FluxPipeline.from_pretrained(str(base_dir), local_files_only=True)
    ref.load_lora_weights(str(folder), weight_name=weight_name, adapter_name="a")
    ref.set_adapters(["a"], [0.8])
    ref.fuse_lora(components=["transformer"], adapter_names=["a"])
    ref.unload_lora_weights()
    return {k: v.clone() for k, v in ref.transformer.state_dict().items()}


@pytest.mark.parametrize("layout", ["kohya", "ai-toolkit"])
def test_flux_lora_matches_diffusers_fuse(flux: dict, tmp_path: Path, layout: str) -> None:
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(str(flux["base_dir"]), local_files_only=True)
    sd = _kohya_flux_lora(pipe)
    if layout == "ai-toolkit":  # the same deltas, diffusers-named (alpha folded: alpha/r = 0.5 into lora_B)
        from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers

        sd = _convert_kohya_flux_lora_to_diffusers(dict(sd))
    write_safetensors(tmp_path / "l.safetensors", sd, {})
    deltas = load_lora(tmp_path / "l.safetensors")
    assert deltas.family == "flux" and deltas.format in ("kohya_flux", "peft")
    module = torch.nn.ModuleDict({"transformer": pipe.transformer})
    fuse_loras(module, [(deltas, 0.8)])
    theirs = _fused_by_diffusers(flux["base_dir"], tmp_path, "l.safetensors")
    for key, value in pipe.transformer.state_dict().items():
        assert torch.allclose(value, theirs[key], atol=1e-5), key


def test_xlabs_lora_matches_hand_formula(flux: dict, tmp_path: Path) -> None:
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(str(flux["base_dir"]), local_files_only=True)
    inner = 32
    gen = torch.Generator().manual_seed(1)
    sd = {}
    for which in ("qkv_lora1", "qkv_lora2", "proj_lora1", "proj_lora2"):
        out_dim = 3 * inner if which.startswith("qkv") else inner
        sd[f"double_blocks.0.processor.{which}.down.weight"] = torch.randn((4, inner), generator=gen)
        sd[f"double_blocks.0.processor.{which}.up.weight"] = torch.randn((out_dim, 4), generator=gen)
    write_safetensors(tmp_path / "x.safetensors", sd, {})
    deltas = load_lora(tmp_path / "x.safetensors")
    assert deltas.format == "xlabs_flux"
    before = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    fuse_loras(torch.nn.ModuleDict({"transformer": pipe.transformer}), [(deltas, 1.0)])
    after = pipe.transformer.state_dict()
    up, down = sd["double_blocks.0.processor.qkv_lora1.up.weight"], sd["double_blocks.0.processor.qkv_lora1.down.weight"]
    want_q = before["transformer_blocks.0.attn.to_q.weight"] + up[:inner] @ down  # XLabs: scale 1
    assert torch.allclose(after["transformer_blocks.0.attn.to_q.weight"], want_q, atol=1e-5)
    want_add_out = before["transformer_blocks.0.attn.to_add_out.weight"] + (
        sd["double_blocks.0.processor.proj_lora2.up.weight"] @ sd["double_blocks.0.processor.proj_lora2.down.weight"])
    assert torch.allclose(after["transformer_blocks.0.attn.to_add_out.weight"], want_add_out, atol=1e-5)


def test_kohya_flux_lora_fused_into_bfl_single_file(flux: dict, tmp_path: Path) -> None:
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(str(flux["expert_dir"]), local_files_only=True)
    write_safetensors(tmp_path / "l.safetensors", _kohya_flux_lora(pipe, seed=2), {})
    deltas = load_lora(tmp_path / "l.safetensors")
    out = merge_checkpoints(flux["expert_file"], [], "task_arithmetic", tmp_path / "m.safetensors", dtype="fp32",
                            loras=[(deltas, 0.8)])
    fuse_loras(torch.nn.ModuleDict({"transformer": pipe.transformer}), [(deltas, 0.8)])
    with open_source(out) as merged, open_source(flux["base_dir"]) as base:
        from merger.model_source import align

        refs = align(base, merged)
        for native, ref in refs.items():
            key = native.split("/", 1)[1]
            assert torch.allclose(ref.load().float(), pipe.transformer.state_dict()[key], atol=1e-5), key


@pytest.mark.parametrize("family,steps", [("flux", 28), ("flux-schnell", 4)])
def test_flux_samples_one_step(flux: dict, settings, family: str, steps: int) -> None:
    from core.families import family as get
    from core.types import MergePlan, PlannedExpert
    from merger.generate import Generator

    assert get(family).steps == steps
    plan = MergePlan(base_family=family, base_model=str(flux["base_dir"]), checkpoints=[
        PlannedExpert(expert_id="x", kind="checkpoint", coefficient=0.5, path=str(flux["expert_file"]))])
    result = Generator(settings).generate(plan, "a (red fox:1.3) <lora:x:1>", negative_prompt="blurry", steps=1,
                                          width=32, height=32, scheduler="Euler")
    assert result.images[0].size == (32, 32)
    assert json.loads((flux["base_dir"] / "model_index.json").read_text())["_class_name"] == "FluxPipeline"
