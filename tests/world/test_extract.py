"""``world.export.extract_lora``: a LoRA extracted from a full fine-tune (kohya's extract script, with LoCon's
convolutions) reproduces the fine-tune's change on every layer it covers, in the merger and in diffusers."""

from __future__ import annotations

from pathlib import Path

import torch

from tests.fakes.zoo import build_tiny_pipeline


def test_full_rank_extraction_reproduces_the_fine_tune_on_linear_and_conv_layers(tmp_path: Path) -> None:
    from safetensors import safe_open

    from merger.lora import fuse_loras, load_lora
    from world.experts import ExpertSpec
    from world.export import extract_lora, write_lora

    pipe = build_tiny_pipeline(tmp_path / "tok")
    base = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    gen = torch.Generator().manual_seed(0)
    tuned = {k: v + 0.05 * torch.randn(v.shape, generator=gen) for k, v in base.items()}
    spec = ExpertSpec("x", "lora", {"style": ("outline",)}, "", layout="kohya", rank=512, extracted=True)
    lora = extract_lora(base, tuned, spec.rank)
    modules = {k.removesuffix(".lora_A.weight") for k in lora if k.endswith(".lora_A.weight")}
    convs = {m for m in modules if base[f"{m}.weight"].ndim == 4}
    assert any(m.endswith("resnets.0.conv1") for m in convs) and any("samplers" in m for m in convs)
    assert any(m.endswith("time_emb_proj") for m in modules) and any(m.endswith("attn1.to_q") for m in modules)
    assert not any(m in ("conv_in", "conv_out") or "norm" in m for m in modules)  # as kohya: not these

    path = tmp_path / "x.kohya.safetensors"
    write_lora(lora, spec, path)
    with safe_open(str(path), "pt") as fh:
        assert '"conv_dim": "512"' in fh.metadata()["ss_network_args"]
    fused = fuse_loras({f"unet.{k}": v for k, v in base.items()}, [(load_lora(path), 1.0)])
    for m in modules:  # full rank: the fine-tune itself, up to the file's fp16 factors
        key = f"{m}.weight"
        assert torch.allclose(fused[f"unet.{key}"], tuned[key], atol=2e-3), key
    untouched = [k for k in base if k.removesuffix(".weight") not in modules]
    assert untouched and all(torch.equal(fused[f"unet.{k}"], base[k]) for k in untouched)

    # diffusers reads the same file (its kohya converter, PEFT's Conv2d LoRA) into the same weights
    pipe.load_lora_weights(str(tmp_path), weight_name=path.name, adapter_name="x")
    pipe.fuse_lora(adapter_names=["x"])
    pipe.unload_lora_weights()
    state = pipe.unet.state_dict()
    assert all(torch.allclose(state[f"{m}.weight"], fused[f"unet.{m}.weight"], atol=1e-4) for m in modules)
