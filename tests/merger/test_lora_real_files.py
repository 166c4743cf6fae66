"""The real LoRA files in tests/fixtures/lora (see PROVENANCE.md) load, name real SD1.5 modules with the right
shapes, and fuse by their formula — or are refused with a clear reason."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from merger.errors import IncompatibleExpert
from merger.lora import UnsupportedLora, fuse_loras, load_lora, lora_updates

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "lora"
DIFFUSERS = FIXTURES / "diffusers_sd15_chiang777.safetensors"
ATTN_PROCS = FIXTURES / "attn_procs_sd15_prushton_logo.safetensors"
LOKR = FIXTURES / "lokr_sd15_smart_falcon_4.safetensors"
CLONEOFSIMO = FIXTURES / "cloneofsimo_lora_disney_inpainting.safetensors"


@pytest.fixture(scope="module")
def sd15_shapes() -> dict[str, torch.Size]:
    """Parameter shapes of the real SD1.5 UNet and CLIP text encoder, built on the meta device (no memory)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(
            sample_size=64, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=768, attention_head_dim=8,
        )
        te = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                          num_attention_heads=12, max_position_embeddings=77))
    shapes = {f"unet.{k}": p.shape for k, p in unet.named_parameters()}
    shapes.update({f"text_encoder.{k}": p.shape for k, p in te.named_parameters()})
    return shapes


@pytest.mark.parametrize(
    ("path", "fmt", "count"),
    [(DIFFUSERS, "diffusers", 128), (ATTN_PROCS, "attn_procs", 128), (LOKR, "lycoris_lokr", 350),
     (CLONEOFSIMO, "cloneofsimo", 192)],
)
def test_real_file_names_sd15_modules_with_fitting_shapes(path: Path, fmt: str, count: int,
                                                          sd15_shapes: dict[str, torch.Size]) -> None:
    lora = load_lora(path)
    assert (lora.format, len(lora), lora.family) == (fmt, count, "sd15")
    # Shape-only check against the real architecture: raises IncompatibleExpert on the first misfit.
    from merger.lora.fuse import _resolve

    misfits = [m for m, d in lora.deltas.items() if not d.fits(sd15_shapes.get(_resolve(f"{m}.weight", sd15_shapes),
                                                                                (0,)))]
    assert misfits == []


def _raw(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def test_diffusers_fixture_fuses_into_matching_linears_by_formula() -> None:
    raw = _raw(DIFFUSERS)
    lora = load_lora(DIFFUSERS)
    module = "unet.up_blocks.2.attentions.1.transformer_blocks.0.attn2.to_k"
    gen = torch.Generator().manual_seed(0)
    base = {f"{module}.weight": torch.randn(640, 768, generator=gen)}
    only = type(lora)(lora.name, lora.format, {module: lora.deltas[module]})
    fused = fuse_loras(base, [(only, 0.6)])
    up, down = raw[f"{module}.lora.up.weight"], raw[f"{module}.lora.down.weight"]
    torch.testing.assert_close(fused[f"{module}.weight"], base[f"{module}.weight"] + 0.6 * (up @ down),
                               rtol=1e-5, atol=1e-6)


def test_lokr_fixture_conv_delta_matches_the_kronecker_formula() -> None:
    raw = _raw(LOKR)
    lora = load_lora(LOKR)
    name = "lora_unet_down_blocks_0_resnets_0_conv1"
    w1 = raw[f"{name}.lokr_w1_a"].float() @ raw[f"{name}.lokr_w1_b"].float()
    w2 = raw[f"{name}.lokr_w2_a"].float() @ raw[f"{name}.lokr_w2_b"].float()
    scale = float(raw[f"{name}.alpha"]) / raw[f"{name}.lokr_w1_b"].shape[0]
    expected = (torch.kron(w1, w2) * scale).reshape(320, 320, 3, 3)
    conv = torch.nn.Conv2d(320, 320, 3, padding=1)
    model = torch.nn.ModuleDict({"unet": torch.nn.Module()})
    model["unet"].add_module("down_blocks", torch.nn.ModuleList([torch.nn.Module()]))
    model["unet"].down_blocks[0].add_module("resnets", torch.nn.ModuleList([torch.nn.Module()]))
    model["unet"].down_blocks[0].resnets[0].add_module("conv1", conv)
    before = conv.weight.detach().clone()
    module = "unet.down_blocks.0.resnets.0.conv1"
    only = type(lora)(lora.name, lora.format, {module: lora.deltas[module]})
    fuse_loras(model, [(only, 1.0)])
    torch.testing.assert_close(conv.weight.detach(), before + expected, rtol=1e-5, atol=1e-5)


def test_lokr_fixture_on_wrong_shapes_is_refused() -> None:
    lora = load_lora(LOKR)
    tiny = {f"{m}.weight": (32, 32) for m in lora.deltas}
    with pytest.raises(IncompatibleExpert, match=r"lokr_sd15_smart_falcon_4.safetensors \(a sd15 LoRA\)"):
        lora_updates(tiny, [(lora, 1.0)])


def test_attn_procs_and_diffusers_layouts_agree_on_the_same_tensors(tmp_path: Path) -> None:
    raw = _raw(DIFFUSERS)
    renamed = {}
    for key, tensor in raw.items():
        stem, role = key.removeprefix("unet.").rsplit(".lora.", 1)
        parent, proj = stem.rsplit(".", 1) if not stem.endswith("to_out.0") else (stem[:-9], "to_out")
        renamed[f"{parent}.processor.{proj}_lora.{role}"] = tensor
    path = tmp_path / "procs.safetensors"
    save_file(renamed, str(path))
    a, b = load_lora(DIFFUSERS), load_lora(path)
    assert a.deltas.keys() == b.deltas.keys()
    assert all(torch.equal(a.deltas[m].up, b.deltas[m].up) and torch.equal(a.deltas[m].down, b.deltas[m].down)
               and a.deltas[m].scale == b.deltas[m].scale for m in a.deltas)


def test_cloneofsimo_fixture_maps_by_verified_module_order() -> None:
    lora = load_lora(CLONEOFSIMO)
    raw = _raw(CLONEOFSIMO)
    names = list(lora.deltas)
    # Entry 4 is the GEGLU projection (320 → 2560) of the first transformer block; 6 and 7 read the text.
    first = "unet.down_blocks.0.attentions.0.transformer_blocks.0"
    assert names[4] == f"{first}.ff.net.0.proj"
    assert names[6] == f"{first}.attn2.to_k"
    assert names[143].startswith("unet.mid_block.")  # lora_diffusion-era diffusers registered mid last
    assert names[144] == "text_encoder.text_model.encoder.layers.0.self_attn.k_proj"
    assert torch.equal(lora.deltas[f"{first}.ff.net.0.proj"].up, raw["unet:4:up"])
    assert set(lora.embeddings) == {"<s1>", "<s2>"}


def test_cloneofsimo_with_unverifiable_order_is_refused(tmp_path: Path) -> None:
    with safe_open(str(CLONEOFSIMO), "pt") as f:
        raw = {k: f.get_tensor(k) for k in f.keys()}
        meta = f.metadata()
    # Drop the GEGLU target from the metadata: the stored entries no longer fit any module order.
    meta = {**meta, "unet": json.dumps(["CrossAttention", "Attention"])}
    path = tmp_path / "reordered.safetensors"
    save_file(raw, str(path), metadata=meta)
    with pytest.raises(UnsupportedLora, match="cloneofsimo lora_diffusion format refused.*match no SD1.5"):
        load_lora(path)
    del meta["unet"]
    save_file(raw, str(path), metadata=meta)
    with pytest.raises(UnsupportedLora, match="no 'unet' target-module list"):
        load_lora(path)
