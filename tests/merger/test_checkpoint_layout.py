"""The tiny zoo, family detection, key-layout conversion and compatibility checks."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from merger.checkpoint_layout import convert_diffusers_to_ldm, convert_ldm_to_diffusers
from merger.errors import IncompatibleExpert
from merger.families import detect_single_file_family, get_family
from merger.merge import merge_checkpoints
from merger.model_source import align, open_source
from tests.fakes.zoo import TinyZoo, build_tiny_zoo

COMPONENT_FILES = {"unet": "unet/diffusion_pytorch_model.safetensors", "vae": "vae/diffusion_pytorch_model.safetensors",
                   "text_encoder": "text_encoder/model.safetensors"}


@pytest.fixture(scope="session")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> TinyZoo:
    return build_tiny_zoo(tmp_path_factory.getbasetemp() / "merger-tiny-zoo")


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_zoo_is_complete_and_reused(zoo: TinyZoo) -> None:
    assert (zoo.base_dir / "model_index.json").is_file()
    assert len(zoo.checkpoints) == 3 and len(zoo.loras_kohya) >= 2 and len(zoo.loras_diffusers) >= 2
    stamp = zoo.base_file.stat().st_mtime_ns
    again = build_tiny_zoo(zoo.root)
    assert again.base_file == zoo.base_file and again.base_file.stat().st_mtime_ns == stamp
    assert all(spec["rank"] != spec["alpha"] for spec in zoo.lora_specs)


def test_zoo_is_deterministic(zoo: TinyZoo, tmp_path: Path) -> None:
    other = build_tiny_zoo(tmp_path / "again")
    assert _sha(other.base_file) == _sha(zoo.base_file)
    assert _sha(other.checkpoints[2]) == _sha(zoo.checkpoints[2])
    assert _sha(other.loras_kohya[1]) == _sha(zoo.loras_kohya[1])


def test_zoo_tokenizer_is_a_real_bpe(zoo: TinyZoo) -> None:
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(str(zoo.base_dir / "tokenizer"))
    ids = [tok(p).input_ids for p in zoo.prompts]
    assert len(tok) > 600
    assert all(len(set(i)) > 6 for i in ids)
    assert ids[0] != ids[1]
    assert len(tok("photo").input_ids) == 3  # bos, one whole-word token, eos


def test_lora_pairs_hold_equal_deltas(zoo: TinyZoo) -> None:
    for (kohya, diffusers), spec in zip(zoo.lora_pairs, zoo.lora_specs, strict=True):
        k, d = load_file(kohya), load_file(diffusers)
        down = {n: t for n, t in k.items() if n.endswith(".lora_down.weight")}
        assert len(down) * 2 == sum(n.endswith((".lora_A.weight", ".lora_B.weight")) for n in d)
        for name, tensor in down.items():
            stem = name.removesuffix(".lora_down.weight")
            assert k[f"{stem}.alpha"].item() == spec["alpha"] and tensor.shape[0] == spec["rank"]
            matches = [n for n in d if n.endswith(".lora_A.weight") and torch.equal(d[n], tensor)]
            assert len(matches) == 1
            peft_stem = matches[0].removesuffix(".lora_A.weight")
            assert peft_stem.split(".", 1)[1].replace(".", "_") == stem.split("_", 2)[2]
            assert torch.equal(d[f"{peft_stem}.lora_B.weight"], k[f"{stem}.lora_up.weight"])


def test_single_file_base_loads_through_diffusers(zoo: TinyZoo) -> None:
    from diffusers import StableDiffusionPipeline

    ref = StableDiffusionPipeline.from_pretrained(zoo.base_dir)
    single = StableDiffusionPipeline.from_single_file(
        str(zoo.base_file), config=str(zoo.base_dir), safety_checker=None, requires_safety_checker=False)
    for component in ("unet", "vae", "text_encoder"):
        a, b = getattr(ref, component).state_dict(), getattr(single, component).state_dict()
        assert set(a) == set(b)
        assert all(torch.equal(a[k], b[k]) for k in a), component


def test_layout_conversion_round_trips_through_diffusers_converters(zoo: TinyZoo) -> None:
    import json

    family = get_family("sd15")
    configs = {c: json.loads((zoo.base_dir / c / "config.json").read_text()) for c in ("unet", "vae")}
    state = {c: load_file(zoo.base_dir / f) for c, f in COMPONENT_FILES.items()}
    ldm = convert_diffusers_to_ldm(family, configs, state)
    assert set(ldm) == set(load_file(zoo.base_file))
    assert ldm["first_stage_model.encoder.mid.attn_1.q.weight"].dim() == 4  # 1×1 conv in the original
    back = convert_ldm_to_diffusers(family, configs, ldm)
    for component, sd in state.items():
        got = {k.removeprefix("text_model."): v for k, v in back[component].items()}
        assert set(got) == set(sd), component
        assert all(torch.equal(got[k], sd[k]) for k in sd), component


def test_family_detection(zoo: TinyZoo, tmp_path: Path) -> None:
    with open_source(zoo.base_file) as src:
        assert src.family.name == "sd15" and src.layout == "single_file"
    with open_source(zoo.base_dir) as src:
        assert src.family.name == "sd15" and src.layout == "diffusers"
    assert detect_single_file_family(["conditioner.embedders.1.model.positional_embedding"]).name == "sdxl"
    assert detect_single_file_family(["double_blocks.0.img_attn.norm.key_norm.scale"]).name == "flux"
    assert detect_single_file_family(["foo.weight"]) is None


def _variant(zoo: TinyZoo, tmp_path: Path, name: str, edit) -> Path:
    sd = load_file(zoo.checkpoints[0])
    edit(sd)
    path = tmp_path / name
    save_file(sd, str(path))
    return path


def test_family_mismatch_names_the_expert(zoo: TinyZoo, tmp_path: Path) -> None:
    sdxl = _variant(zoo, tmp_path, "fake-sdxl.safetensors", lambda sd: sd.update(
        {"conditioner.embedders.1.model.positional_embedding": torch.zeros(77, 8)}))
    with pytest.raises(IncompatibleExpert, match=r"fake-sdxl\.safetensors is a sdxl model but the base .* is sd15"):
        merge_checkpoints(zoo.base_file, [(sdxl, 0.5)], "task_arithmetic", tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()


def test_shape_mismatch_names_expert_and_first_key(zoo: TinyZoo, tmp_path: Path) -> None:
    bad_key = "model.diffusion_model.input_blocks.1.1.proj_in.weight"

    def edit(sd):
        sd[bad_key] = torch.zeros(7, 7, 1, 1)
        sd["model.diffusion_model.out.2.weight"] = torch.zeros(1)  # a later key: not the first mismatch
    wide = _variant(zoo, tmp_path, "wide.safetensors", edit)
    with pytest.raises(IncompatibleExpert, match=rf"wide\.safetensors: tensor '{bad_key}' has shape \(7, 7, 1, 1\)"):
        merge_checkpoints(zoo.base_file, [(zoo.checkpoints[1], 0.5), (wide, 0.5)], "ties",
                          tmp_path / "out.safetensors")


def test_missing_tensor_and_lora_as_checkpoint(zoo: TinyZoo, tmp_path: Path) -> None:
    gone = "model.diffusion_model.out.0.bias"
    short = _variant(zoo, tmp_path, "short.safetensors", lambda sd: sd.pop(gone))
    with pytest.raises(IncompatibleExpert, match=rf"short\.safetensors: missing tensor '{gone}'"):
        merge_checkpoints(zoo.base_file, [(short, 0.5)], "task_arithmetic", tmp_path / "out.safetensors")
    with pytest.raises(IncompatibleExpert, match="looks like a LoRA"):
        merge_checkpoints(zoo.base_file, [(zoo.loras_kohya[0], 0.5)], "task_arithmetic", tmp_path / "o.safetensors")


def test_unet_only_expert_changes_only_the_unet(zoo: TinyZoo, tmp_path: Path) -> None:
    full = load_file(zoo.checkpoints[0])
    unet_only = tmp_path / "unet-only.safetensors"
    save_file({k: v for k, v in full.items() if k.startswith("model.diffusion_model.")}, str(unet_only))
    out = merge_checkpoints(zoo.base_file, [(unet_only, 1.0)], "task_arithmetic", tmp_path / "o.safetensors",
                            dtype="fp32")
    merged, base = load_file(out), load_file(zoo.base_file)
    for key, value in merged.items():
        expected = full[key] if key.startswith("model.diffusion_model.") else base[key]
        assert torch.equal(value, expected), key


def test_align_maps_diffusers_expert_onto_single_file_base(zoo: TinyZoo) -> None:
    with open_source(zoo.base_file) as base, open_source(zoo.base_dir) as expert:
        refs = align(base, expert)
        single = load_file(zoo.base_file)
        assert set(refs) == set(single)
        assert all(torch.equal(refs[k].load(), single[k]) for k in single)


SD15_UNET = dict(  # the published SD1.5 UNet config (structure only matters here)
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8,
)
SD15_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, sample_size=512,
)


def test_full_size_sd15_layout_matches_diffusers_converters() -> None:
    """The generalised key tables at real SD1.5 structure (meta tensors: no memory, no weights)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders import single_file_utils as sfu

    from merger.checkpoint_layout import infer_ldm_configs, ldm_key_map, ldm_key_to_diffusers, ldm_tables

    with torch.device("meta"):
        unet, vae = UNet2DConditionModel(**SD15_UNET), AutoencoderKL(**SD15_VAE)
    family = get_family("sd15")
    configs = {"unet": dict(unet.config), "vae": dict(vae.config)}
    state = {"unet": unet.state_dict(), "vae": vae.state_dict()}
    mapping = ldm_key_map(family, configs, {c: list(sd) for c, sd in state.items()})
    assert "model.diffusion_model.output_blocks.11.0.skip_connection.weight" in mapping  # diffusers' "v1" sentinel
    ldm = {name: state[w.component][w.key] for name, w in mapping.items()}
    ldm = {k: (v[:, :, None, None] if mapping[k].conv_1x1 else v) for k, v in ldm.items()}
    for component, convert in (("unet", sfu.convert_ldm_unet_checkpoint), ("vae", sfu.convert_ldm_vae_checkpoint)):
        back = convert(dict(ldm), configs[component])
        assert set(back) == set(state[component]), component
        assert all(back[k].shape == state[component][k].shape for k in back), component
    inferred = infer_ldm_configs(list(ldm), family)
    tables = ldm_tables(inferred)
    assert all(ldm_key_to_diffusers(k, family, inferred, tables) == w for k, w in mapping.items())
