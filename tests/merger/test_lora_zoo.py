"""LoRA fusion on the tiny zoo: kohya and diffusers layouts of the same LoRA fuse identically, and our fuse path
equals diffusers' own ``load_lora_weights`` + ``set_adapters`` + ``fuse_lora`` path."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from merger.lora import fuse_loras, load_lora
from tests.fakes.zoo import TinyZoo, build_tiny_zoo


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> TinyZoo:
    return build_tiny_zoo(tmp_path_factory.getbasetemp() / "tiny-zoo")


def _pipeline(zoo: TinyZoo):
    from diffusers import StableDiffusionPipeline

    from merger.diffusers_pipeline import _quiet

    with _quiet():
        pipe = StableDiffusionPipeline.from_pretrained(str(zoo.base_dir), safety_checker=None,
                                                       requires_safety_checker=False, local_files_only=True)
    return pipe


def _components(pipe) -> torch.nn.ModuleDict:
    return torch.nn.ModuleDict({"unet": pipe.unet, "text_encoder": pipe.text_encoder})


def test_kohya_and_diffusers_layouts_fuse_identically(zoo: TinyZoo) -> None:
    base = _components(_pipeline(zoo)).state_dict()
    for kohya, diffusers in zoo.lora_pairs:
        a = fuse_loras(base, [(load_lora(kohya), 0.8)])
        b = fuse_loras(base, [(load_lora(diffusers), 0.8)])
        changed = [k for k in base if not torch.equal(base[k], a[k])]
        assert len(changed) == 40  # every attention projection of the tiny UNet and text encoder
        assert all(torch.equal(a[k], b[k]) for k in base)


def test_fused_weights_equal_base_plus_weighted_alpha_over_rank_BA(zoo: TinyZoo) -> None:
    base = _components(_pipeline(zoo)).state_dict()
    weights = [0.7, -0.4]
    fused = fuse_loras(base, [(load_lora(p), w) for p, w in zip(zoo.loras_kohya, weights, strict=True)])
    module = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    expected = base["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"].clone()
    for path, w in zip(zoo.loras_kohya, weights, strict=True):
        with safe_open(str(path), "pt") as f:
            down, up = f.get_tensor(f"{module}.lora_down.weight"), f.get_tensor(f"{module}.lora_up.weight")
            alpha = float(f.get_tensor(f"{module}.alpha"))
        expected += w * (alpha / down.shape[0]) * (up @ down)
    got = fused["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_fuse_equals_diffusers_set_adapters_and_fuse_lora(zoo: TinyZoo) -> None:
    from merger.diffusers_pipeline import _quiet

    base = _components(_pipeline(zoo)).state_dict()
    pairs = [(zoo.loras_kohya[0], 0.7), (zoo.loras_diffusers[1], 0.3)]
    ours = fuse_loras(base, [(load_lora(p), w) for p, w in pairs])

    pipe = _pipeline(zoo)
    with _quiet():
        for i, (path, _) in enumerate(pairs):
            pipe.load_lora_weights(str(Path(path).parent), weight_name=Path(path).name, adapter_name=f"a{i}")
        pipe.set_adapters([f"a{i}" for i in range(len(pairs))], [w for _, w in pairs])
        pipe.fuse_lora(components=["unet", "text_encoder"])
        pipe.unload_lora_weights()
    theirs = _components(pipe).state_dict()
    assert theirs.keys() == ours.keys()
    assert any(not torch.equal(base[k], ours[k]) for k in base)
    assert max((theirs[k] - ours[k]).abs().max().item() for k in ours) < 1e-5
