"""LoRA normaliser and fusion on small hand-made tensors: every layout's delta equals its formula."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from merger.errors import CorruptWeights, IncompatibleExpert, MergeError, UnsafeFormat
from merger.lora import (
    LoraDeltas,
    UnsupportedLora,
    convert_deltas_to_peft,
    fuse_loras,
    fused_loras,
    load_lora,
    normalize_lora,
)
from merger.lora.formats.kohya import kohya_name_to_diffusers

ATTN = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
KOHYA_ATTN = "lora_unet_" + ATTN.replace(".", "_")
CONV = "down_blocks.0.resnets.0.conv1"
KOHYA_CONV = "lora_unet_" + CONV.replace(".", "_")


def g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(shape, generator=g(seed))


def kohya_lora(rank: int, alpha: float | None, out: int = 6, inp: int = 5, seed: int = 0) -> dict[str, torch.Tensor]:
    sd = {f"{KOHYA_ATTN}.lora_down.weight": rand(rank, inp, seed=seed),
          f"{KOHYA_ATTN}.lora_up.weight": rand(out, rank, seed=seed + 1)}
    if alpha is not None:
        sd[f"{KOHYA_ATTN}.alpha"] = torch.tensor(alpha)
    return sd


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        (KOHYA_ATTN, f"unet.{ATTN}"),
        ("lora_unet_mid_block_attentions_0_transformer_blocks_0_ff_net_0_proj",
         "unet.mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj"),
        ("lora_unet_up_blocks_1_attentions_2_transformer_blocks_0_attn2_to_out_0",
         "unet.up_blocks.1.attentions.2.transformer_blocks.0.attn2.to_out.0"),
        ("lora_unet_down_blocks_1_resnets_0_conv_shortcut", "unet.down_blocks.1.resnets.0.conv_shortcut"),
        ("lora_unet_up_blocks_3_resnets_2_time_emb_proj", "unet.up_blocks.3.resnets.2.time_emb_proj"),
        ("lora_unet_down_blocks_0_downsamplers_0_conv", "unet.down_blocks.0.downsamplers.0.conv"),
        ("lora_unet_down_blocks_2_attentions_1_proj_in", "unet.down_blocks.2.attentions.1.proj_in"),
        ("lora_te_text_model_encoder_layers_11_self_attn_out_proj",
         "text_encoder.text_model.encoder.layers.11.self_attn.out_proj"),
        ("lora_te_text_model_encoder_layers_0_mlp_fc1", "text_encoder.text_model.encoder.layers.0.mlp.fc1"),
        ("lora_te2_text_model_encoder_layers_3_self_attn_q_proj",
         "text_encoder_2.text_model.encoder.layers.3.self_attn.q_proj"),
        ("not_a_kohya_name", None),
    ],
)
def test_kohya_names_map_to_diffusers_modules(name: str, expected: str | None) -> None:
    assert kohya_name_to_diffusers(name) == expected


def test_fused_weight_equals_base_plus_weighted_scaled_BA() -> None:
    base = {f"unet.{ATTN}.weight": rand(6, 5, seed=10), "unet.other.weight": rand(3, 3, seed=11)}
    a_sd, b_sd = kohya_lora(2, 1.0, seed=1), kohya_lora(3, 6.0, seed=5)
    a, b = normalize_lora(a_sd, {}, "a"), normalize_lora(b_sd, {}, "b")
    fused = fuse_loras(base, [(a, 0.7), (b, -0.3)])

    def delta(sd: dict[str, torch.Tensor]) -> torch.Tensor:
        down, up = sd[f"{KOHYA_ATTN}.lora_down.weight"], sd[f"{KOHYA_ATTN}.lora_up.weight"]
        return up @ down * (float(sd[f"{KOHYA_ATTN}.alpha"]) / down.shape[0])

    expected = base[f"unet.{ATTN}.weight"] + 0.7 * delta(a_sd) - 0.3 * delta(b_sd)
    torch.testing.assert_close(fused[f"unet.{ATTN}.weight"], expected, rtol=0, atol=1e-6)
    assert fused["unet.other.weight"] is base["unet.other.weight"]
    assert not torch.equal(base[f"unet.{ATTN}.weight"], fused[f"unet.{ATTN}.weight"])  # input untouched


def test_missing_alpha_means_scale_one() -> None:
    lora = normalize_lora(kohya_lora(4, None), {}, "x")
    assert lora.deltas[f"unet.{ATTN}"].scale == 1.0
    assert normalize_lora(kohya_lora(4, 2.0), {}, "x").deltas[f"unet.{ATTN}"].scale == 0.5


def test_locon_conv_delta_acts_like_the_two_convolutions() -> None:
    down, up = rand(2, 4, 3, 3, seed=1), rand(5, 2, 1, 1, seed=2)
    lora = normalize_lora({f"{KOHYA_CONV}.lora_down.weight": down, f"{KOHYA_CONV}.lora_up.weight": up,
                           f"{KOHYA_CONV}.alpha": torch.tensor(1.0)}, {}, "locon")
    assert lora.format == "lycoris_locon"
    delta = lora.deltas[f"unet.{CONV}"].materialize((5, 4, 3, 3))
    x = rand(1, 4, 7, 7, seed=3)
    chained = F.conv2d(F.conv2d(x, down, padding=1), up) * 0.5
    torch.testing.assert_close(F.conv2d(x, delta, padding=1), chained, rtol=1e-5, atol=1e-5)


def test_locon_tucker_mid_acts_like_three_convolutions() -> None:
    down, mid, up = rand(2, 4, 1, 1, seed=1), rand(2, 2, 3, 3, seed=2), rand(5, 2, 1, 1, seed=3)
    lora = normalize_lora({f"{KOHYA_CONV}.lora_down.weight": down, f"{KOHYA_CONV}.lora_mid.weight": mid,
                           f"{KOHYA_CONV}.lora_up.weight": up, f"{KOHYA_CONV}.alpha": torch.tensor(2.0)}, {}, "t")
    delta = lora.deltas[f"unet.{CONV}"]
    assert not delta.is_low_rank
    x = rand(1, 4, 6, 6, seed=4)
    chained = F.conv2d(F.conv2d(F.conv2d(x, down), mid, padding=1), up)
    torch.testing.assert_close(F.conv2d(x, delta.materialize((5, 4, 3, 3)), padding=1), chained,
                               rtol=1e-4, atol=1e-4)


def test_loha_delta_is_hadamard_of_two_products_times_alpha_over_rank() -> None:
    w1a, w1b, w2a, w2b = rand(6, 2, seed=1), rand(2, 5, seed=2), rand(6, 2, seed=3), rand(2, 5, seed=4)
    sd = {f"{KOHYA_ATTN}.hada_w1_a": w1a, f"{KOHYA_ATTN}.hada_w1_b": w1b, f"{KOHYA_ATTN}.hada_w2_a": w2a,
          f"{KOHYA_ATTN}.hada_w2_b": w2b, f"{KOHYA_ATTN}.alpha": torch.tensor(1.0)}
    lora = normalize_lora(sd, {}, "loha")
    assert lora.format == "lycoris_loha" and not lora.is_low_rank
    expected = torch.empty(6, 5)
    for i in range(6):
        for j in range(5):
            expected[i, j] = (w1a[i] @ w1b[:, j]) * (w2a[i] @ w2b[:, j]) * 0.5
    torch.testing.assert_close(lora.deltas[f"unet.{ATTN}"].materialize(), expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(UnsupportedLora, match="not low rank"):
        convert_deltas_to_peft(lora)


def _kron_by_blocks(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(a.shape[0] * b.shape[0], a.shape[1] * b.shape[1])
    for i in range(a.shape[0]):
        for j in range(a.shape[1]):
            out[i * b.shape[0]:(i + 1) * b.shape[0], j * b.shape[1]:(j + 1) * b.shape[1]] = a[i, j] * b
    return out


def test_lokr_full_factors_ignore_alpha() -> None:
    w1, w2 = rand(2, 3, seed=1), rand(3, 2, seed=2)
    lora = normalize_lora({f"{KOHYA_ATTN}.lokr_w1": w1, f"{KOHYA_ATTN}.lokr_w2": w2,
                           f"{KOHYA_ATTN}.alpha": torch.tensor(7.0)}, {}, "lokr")
    delta = lora.deltas[f"unet.{ATTN}"]
    assert delta.scale == 1.0 and delta.shape() == (6, 6)
    torch.testing.assert_close(delta.materialize(), _kron_by_blocks(w1, w2))


def test_lokr_factorised_scale_is_alpha_over_rank() -> None:
    w1a, w1b, w2a, w2b = rand(2, 2, seed=1), rand(2, 3, seed=2), rand(3, 2, seed=3), rand(2, 2, seed=4)
    lora = normalize_lora({f"{KOHYA_ATTN}.lokr_w1_a": w1a, f"{KOHYA_ATTN}.lokr_w1_b": w1b,
                           f"{KOHYA_ATTN}.lokr_w2_a": w2a, f"{KOHYA_ATTN}.lokr_w2_b": w2b,
                           f"{KOHYA_ATTN}.alpha": torch.tensor(1.0)}, {}, "lokr")
    expected = _kron_by_blocks(w1a @ w1b, w2a @ w2b) * 0.5
    torch.testing.assert_close(lora.deltas[f"unet.{ATTN}"].materialize(), expected, rtol=1e-5, atol=1e-6)


def test_lokr_conv_with_flattened_factors_is_reshaped_to_the_kernel() -> None:
    # Old LyCORIS (the real fixture files) stores a 3x3 conv LoKr as 2-D factors over in·kh·kw.
    w1, w2a, w2b = rand(2, 6, seed=1), rand(3, 2, seed=2), rand(2, 6, seed=3)
    lora = normalize_lora({f"{KOHYA_CONV}.lokr_w1": w1, f"{KOHYA_CONV}.lokr_w2_a": w2a,
                           f"{KOHYA_CONV}.lokr_w2_b": w2b, f"{KOHYA_CONV}.alpha": torch.tensor(2.0)}, {}, "k")
    delta = lora.deltas[f"unet.{CONV}"]
    assert delta.fits((6, 4, 3, 3)) and not delta.fits((6, 4, 3, 2))
    expected = _kron_by_blocks(w1, w2a @ w2b).reshape(6, 4, 3, 3)  # scale = 2 / rank 2
    torch.testing.assert_close(delta.materialize((6, 4, 3, 3)), expected, rtol=1e-5, atol=1e-6)


def test_attention_processor_and_peft_layouts_name_the_same_modules() -> None:
    down, up = rand(2, 5, seed=1), rand(6, 2, seed=2)
    block = "down_blocks.0.attentions.0.transformer_blocks.0.attn2"
    procs = normalize_lora({f"{block}.processor.to_out_lora.down.weight": down,
                            f"{block}.processor.to_out_lora.up.weight": up}, {}, "procs")
    peft = normalize_lora({f"unet.{block}.to_out.0.lora_A.weight": down,
                           f"unet.{block}.to_out.0.lora_B.weight": up}, {}, "peft")
    legacy = normalize_lora({f"unet.{block}.to_out.0.lora.down.weight": down,
                             f"unet.{block}.to_out.0.lora.up.weight": up}, {}, "diffusers")
    assert (procs.format, peft.format, legacy.format) == ("attn_procs", "peft", "diffusers")
    assert list(procs.deltas) == list(peft.deltas) == list(legacy.deltas) == [f"unet.{block}.to_out.0"]


def test_peft_alpha_comes_from_adapter_metadata_and_alpha_pattern() -> None:
    import json

    sd = {f"unet.{ATTN}.lora_A.weight": rand(4, 5), f"unet.{ATTN}.lora_B.weight": rand(6, 4),
          "unet.mid.proj.lora_A.weight": rand(4, 5), "unet.mid.proj.lora_B.weight": rand(6, 4)}
    meta = {"lora_adapter_metadata": json.dumps({"unet.r": 4, "unet.lora_alpha": 8, "unet.alpha_pattern": {"proj": 2}})}
    lora = normalize_lora(sd, meta, "p")
    assert lora.deltas[f"unet.{ATTN}"].scale == 2.0
    assert lora.deltas["unet.mid.proj"].scale == 0.5
    assert normalize_lora(sd, {}, "p").deltas[f"unet.{ATTN}"].scale == 1.0


def test_unconsumed_keys_are_listed_in_the_error() -> None:
    sd = {**kohya_lora(2, 1.0), f"{KOHYA_ATTN}.dora_scale": rand(6, 1), "lora_unet_x.mystery": rand(1)}
    with pytest.raises(UnsupportedLora, match=r"2 key\(s\).*dora_scale"):
        normalize_lora(sd, {}, "odd")


def test_unknown_layout_is_refused() -> None:
    with pytest.raises(UnsupportedLora, match="not a LoRA in any known layout"):
        normalize_lora({"model.diffusion_model.out.2.weight": rand(2, 2)}, {}, "ckpt")


def test_module_fusion_restores_bit_exactly() -> None:
    model = torch.nn.ModuleDict({"unet": torch.nn.Module()})
    leaf = model["unet"]
    for part in ATTN.split(".")[:-1]:
        leaf.add_module(part, torch.nn.Module())
        leaf = getattr(leaf, part)
    leaf.add_module("to_q", torch.nn.Linear(5, 6, bias=False))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    lora = normalize_lora(kohya_lora(2, 1.0), {}, "a")
    with fused_loras(model, [(lora, 0.9)]):
        fused = model.state_dict()[f"unet.{ATTN}.weight"].clone()
    expected = fuse_loras(before, [(lora, 0.9)])[f"unet.{ATTN}.weight"]
    torch.testing.assert_close(fused, expected, rtol=0, atol=0)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_shape_mismatch_names_the_lora_and_the_key() -> None:
    base = {f"unet.{ATTN}.weight": torch.zeros(8, 8)}
    lora = normalize_lora(kohya_lora(2, 1.0), {}, "tiny-style.safetensors")
    with pytest.raises(IncompatibleExpert, match=rf"tiny-style.safetensors.*{ATTN}\.weight \(6, 5\).*\(8, 8\)"):
        fuse_loras(base, [(lora, 1.0)])
    assert torch.equal(base[f"unet.{ATTN}.weight"], torch.zeros(8, 8))


def test_sdxl_lora_on_sd15_base_is_incompatible() -> None:
    name = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k"
    sd = {f"{name}.lora_down.weight": rand(4, 2048), f"{name}.lora_up.weight": rand(640, 4),
          "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": rand(4, 1280),
          "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": rand(1280, 4)}
    lora = normalize_lora(sd, {}, "xl-style")
    assert lora.family == "sdxl"
    base = {"unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight": torch.zeros(640, 768)}
    with pytest.raises(IncompatibleExpert, match="xl-style \\(a sdxl LoRA\\).*first mismatching key"):
        fuse_loras(base, [(lora, 1.0)])


def test_files_pickle_refused_truncated_and_missing(tmp_path: Path) -> None:
    pickled = tmp_path / "lora.pt"
    torch.save(kohya_lora(2, 1.0), pickled)
    with pytest.raises(UnsafeFormat, match="pickle"):
        load_lora(pickled)
    assert isinstance(load_lora(pickled, allow_pickle=True), LoraDeltas)

    good = tmp_path / "lora.safetensors"
    save_file(kohya_lora(2, 1.0), str(good))
    truncated = tmp_path / "cut.safetensors"
    truncated.write_bytes(good.read_bytes()[:-20])
    with pytest.raises(CorruptWeights, match="truncated"):
        load_lora(truncated)
    with pytest.raises(MergeError, match="not found"):
        load_lora(tmp_path / "absent.safetensors", name="My LoRA")
