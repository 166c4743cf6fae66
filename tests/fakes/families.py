"""Tiny random SDXL and FLUX.1 pipelines (real diffusers/transformers classes, scaled-down shapes), built
offline for tests and the CPU run of ``benchmarks/families.py``.

The SDXL UNet keeps SDXL's block structure (three levels, two layers per level, attention in the last two,
``text_time`` size conditioning), so kohya's original block names map exactly as they do for real files.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from tests.fakes.zoo import write_tiny_tokenizer

if TYPE_CHECKING:
    from diffusers import FluxPipeline, StableDiffusionXLPipeline


def tiny_sdxl_unet_config() -> dict:
    return dict(
        sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64, 64), layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 1, 2), cross_attention_dim=72, attention_head_dim=(2, 4, 4),
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=80, norm_num_groups=32,
    )


def build_tiny_sdxl_pipeline(tokenizer_dir: Path, seed: int = 0) -> StableDiffusionXLPipeline:
    """A random tiny SDXL-architecture pipeline (CLIP-L-like te1 width 32, CLIP-G-like te2 width 40 with a
    32-d projection; cross-attention 72 = 32 + 40, size conditioning 80 = 6 × 8 + 32)."""
    import torch
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    write_tiny_tokenizer(tokenizer_dir)
    tokenizer = CLIPTokenizer.from_pretrained(str(tokenizer_dir))
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**tiny_sdxl_unet_config())
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(32, 64), layers_per_block=1, latent_channels=4,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), norm_num_groups=32, sample_size=32,
    )
    common = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, projection_dim=32)
    torch.manual_seed(seed + 2)
    te1 = CLIPTextModel(CLIPTextConfig(**common, hidden_act="quick_gelu"))
    torch.manual_seed(seed + 3)
    # te2 wider than te1, as in SDXL (768 vs 1280): diffusers' single-file reader tells them apart by width
    te2 = CLIPTextModelWithProjection(CLIPTextConfig(**{**common, "hidden_size": 40}, hidden_act="gelu"))
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1, timestep_spacing="leading")
    tokenizer_2 = CLIPTokenizer.from_pretrained(str(tokenizer_dir))  # its own object, as in real SDXL
    return StableDiffusionXLPipeline(vae=vae, text_encoder=te1, text_encoder_2=te2, tokenizer=tokenizer,
                                     tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler)


def write_tiny_t5_tokenizer(directory: Path) -> Path:
    """A small T5-style Unigram tokenizer (``tokenizers``), saved as a ``T5TokenizerFast`` directory."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import T5TokenizerFast

    from tests.fakes.zoo import _EXTRA_WORDS, SAMPLE_PROMPTS

    words = sorted({w for text in [*SAMPLE_PROMPTS, " ".join(_EXTRA_WORDS)] for w in text.lower().split()})
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [("▁" + w, -1.0) for w in words]
    vocab += [(c, -5.0) for c in "abcdefghijklmnopqrstuvwxyz0123456789,.▁"]
    tok = Tokenizer(models.Unigram(vocab, unk_id=2))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    fast = T5TokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                           extra_ids=0, model_max_length=64)
    directory.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(directory))
    config = directory / "tokenizer_config.json"
    data = json.loads(config.read_text())
    data["model_max_length"] = 64
    config.write_text(json.dumps(data))
    return directory


def tiny_flux_transformer_config() -> dict:
    return dict(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
                num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8],
                guidance_embeds=True)


def build_tiny_flux_pipeline(tokenizer_dir: Path, seed: int = 0, guidance_embeds: bool = True) -> FluxPipeline:
    """A random tiny FLUX.1-architecture pipeline (dev-like with guidance embedding, schnell-like without)."""
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTokenizer,
        T5Config,
        T5EncoderModel,
        T5TokenizerFast,
    )

    write_tiny_tokenizer(tokenizer_dir / "clip")
    write_tiny_t5_tokenizer(tokenizer_dir / "t5")
    tokenizer = CLIPTokenizer.from_pretrained(str(tokenizer_dir / "clip"))
    tokenizer_2 = T5TokenizerFast.from_pretrained(str(tokenizer_dir / "t5"))
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(**{**tiny_flux_transformer_config(), "guidance_embeds": guidance_embeds})
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(32, 64), layers_per_block=1, latent_channels=1,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), norm_num_groups=32, sample_size=32,
        use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035,
    )
    torch.manual_seed(seed + 2)
    te = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, projection_dim=32))
    torch.manual_seed(seed + 3)
    te2 = T5EncoderModel(T5Config(vocab_size=len(tokenizer_2), d_model=32, d_kv=8, d_ff=37, num_layers=2,
                                  num_heads=4, relative_attention_num_buckets=8, is_encoder_decoder=False,
                                  use_cache=False))
    scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False)
    return FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=te, tokenizer=tokenizer, text_encoder_2=te2,
                        tokenizer_2=tokenizer_2, transformer=transformer)


def write_original_file(pipe: object, path: Path, prefixes: dict[str, str] | None = None,
                        dtype: object = None) -> Path:
    """Write a pipeline's merged components as one original-layout single file (real key names)."""
    import tempfile

    from merger.checkpoint_layout import original_from_segments
    from merger.merge_writer import write_safetensors
    from merger.model_source import open_source, segments_of

    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        with open_source(Path(tmp)) as src:
            prefixes = prefixes if prefixes is not None else dict(src.family.prefixes)
            segs = segments_of(src, prefixes)
            tensors = {(c, k): wf.get(k) for c, wf in src.files.items() for k in wf.keys()}
            out = original_from_segments(segs, tensors)
    if dtype is not None:
        out = {k: v.to(dtype) for k, v in out.items()}
    return write_safetensors(path, out, {"format": "pt"})
