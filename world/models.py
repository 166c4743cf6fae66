"""Architectures of the world: a small Stable Diffusion 1.5 pipeline (diffusers classes, real configs), the
attribute reader and the CLIP scorer. Sizes are chosen to train on two CPU cores and to ship in a few MB."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch import nn

from world import grammar

MAX_TOKENS = 24  # the longest prompt of the grammar is 17 CLIP tokens with BOS/EOS
IMAGE_SIZE = grammar.SIZE

# SD1.5's UNet layout shrunk: no attention at the top level (as SD's last level has none), cross-attention below.
# 2.2 M parameters, so six full fine-tunes ship in 26 MB of fp16.
UNET_CONFIG: dict[str, Any] = dict(
    sample_size=IMAGE_SIZE // 4, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64, 80),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=64, attention_head_dim=8, norm_num_groups=16,
)
# A 4× (not SD's 8×) autoencoder with 4 latent channels: at 64×64 an 8× latent is 8×8 and, trained on two
# cores, lost colours and thin strokes (reader accuracy after a round trip: colour 0.57, style 0.67); the 4× one
# keeps them (colour 0.98 after 1,200 steps).
VAE_CONFIG: dict[str, Any] = dict(
    in_channels=3, out_channels=3, block_out_channels=(32, 64, 64), layers_per_block=1, latent_channels=4,
    down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
    norm_num_groups=8, sample_size=IMAGE_SIZE,
)
SCHEDULER_CONFIG: dict[str, Any] = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon",
)


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP/GPT-2's reversible byte → printable character table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


def grammar_words() -> Counter:
    words: Counter = Counter()
    text = " ".join(p for attr in grammar.PHRASES.values() for ps in attr.values() for p in ps)
    text += " a an image of on in with style background"
    words.update(re.findall(r"[a-z]+", text))
    return words


def write_tokenizer(directory: Path) -> Path:
    """The world's CLIP BPE tokenizer, learned on the grammar's words until every word is one token."""
    return write_clip_tokenizer(directory, grammar_words())


def write_clip_tokenizer(directory: Path, words: Counter, max_merges: int | None = None,
                         model_max_length: int = MAX_TOKENS) -> Path:
    """A real CLIP BPE tokenizer (vocab.json + merges.txt) learned on ``words`` (word → count), with at most
    ``max_merges`` merges (None: until nothing is left to merge); other text still tokenizes (into characters)."""
    directory.mkdir(parents=True, exist_ok=True)
    chars = list(_bytes_to_unicode().values())
    vocab_tokens = chars + [c + "</w>" for c in chars]
    splits = {w: [*w[:-1], w[-1] + "</w>"] for w in words}
    merges: list[tuple[str, str]] = []
    while max_merges is None or len(merges) < max_merges:
        # plain BPE: the most frequent adjacent pair, ties alphabetical (deterministic)
        pairs: Counter = Counter()
        for w, parts in splits.items():
            for a, b in zip(parts, parts[1:], strict=False):
                pairs[(a, b)] += words[w]
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        for w, parts in splits.items():
            i, merged = 0, []
            while i < len(parts):
                if i + 1 < len(parts) and (parts[i], parts[i + 1]) == best:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            splits[w] = merged
    vocab_tokens += ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(vocab_tokens))}
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": model_max_length, "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
        "do_lower_case": True,
    }))
    (directory / "special_tokens_map.json").write_text(json.dumps({
        "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>"}))
    return directory


def text_config(tokenizer: Any) -> Any:
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=MAX_TOKENS, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, projection_dim=64,
    )


def new_pipeline(tokenizer_dir: Path, seed: int) -> Any:
    """A freshly initialised world pipeline (diffusers ``StableDiffusionPipeline``, DDIM scheduler)."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(str(tokenizer_dir))
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**UNET_CONFIG)
    vae = AutoencoderKL(**VAE_CONFIG)
    text_encoder = CLIPTextModel(text_config(tokenizer))
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=DDIMScheduler(**SCHEDULER_CONFIG),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


class Reader(nn.Module):
    """The attribute reader: a small CNN with one classification head per attribute."""

    def __init__(self) -> None:
        super().__init__()

        def block(i: int, o: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU(), nn.MaxPool2d(2))

        # global pooling would lose where things are (a shadow is an offset copy), so the last map is flattened
        self.body = nn.Sequential(block(3, 16), block(16, 32), block(32, 64), block(64, 64), nn.Flatten())
        self.heads = nn.ModuleDict({a: nn.Sequential(nn.Linear(64 * 16, 128), nn.ReLU(),
                                                     nn.Linear(128, len(grammar.VALUES[a])))
                                    for a in grammar.ATTRIBUTES})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.body(x)
        return {a: head(h) for a, head in self.heads.items()}


def clip_config(tokenizer: Any) -> Any:
    from transformers import CLIPConfig, CLIPTextConfig, CLIPVisionConfig

    text = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=MAX_TOKENS, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, projection_dim=64,
    )
    vision = CLIPVisionConfig(image_size=IMAGE_SIZE, patch_size=8, hidden_size=96, intermediate_size=192,
                              num_hidden_layers=3, num_attention_heads=4, projection_dim=64)
    return CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=64)


def to_tensor(images: list[Any]) -> torch.Tensor:
    """PIL images → float tensor in [-1, 1], NCHW."""
    import numpy as np

    arr = np.stack([np.asarray(im.convert("RGB").resize((IMAGE_SIZE, IMAGE_SIZE)), dtype=np.uint8) for im in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
