"""Independent forward passes of the original architectures, straight from their released key formats.

Written from the original code's structure (OpenCLIP's ``VisionTransformer``/``TextTransformer`` with
``nn.MultiheadAttention`` resblocks; BLIP's timm-style ViT and ``med.py`` BERT with cross-attention; the
ImageReward MLP and its standardisation), sharing nothing with the transformers classes the scorers use.
Also writes tiny random checkpoints in those key formats.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def _ln(x: Tensor, p: dict[str, Tensor], key: str, eps: float) -> Tensor:
    return F.layer_norm(x, (x.shape[-1],), p[f"{key}.weight"], p[f"{key}.bias"], eps)


def _lin(x: Tensor, p: dict[str, Tensor], key: str) -> Tensor:
    return F.linear(x, p[f"{key}.weight"], p.get(f"{key}.bias"))


# -- OpenCLIP -------------------------------------------------------------------------------------------
def _oc_resblock(x: Tensor, p: dict[str, Tensor], pre: str, heads: int, mask: Tensor | None) -> Tensor:
    h = _ln(x, p, pre + "ln_1", 1e-5)
    a, _ = F.multi_head_attention_forward(
        h, h, h, x.shape[-1], heads, p[pre + "attn.in_proj_weight"], p[pre + "attn.in_proj_bias"], None, None,
        False, 0.0, p[pre + "attn.out_proj.weight"], p[pre + "attn.out_proj.bias"], training=False,
        need_weights=False, attn_mask=mask)
    x = x + a
    h = _ln(x, p, pre + "ln_2", 1e-5)
    return x + _lin(F.gelu(_lin(h, p, pre + "mlp.c_fc")), p, pre + "mlp.c_proj")


def _layers(p: dict[str, Tensor], prefix: str) -> int:
    return len({k[len(prefix):].split(".")[0] for k in p if k.startswith(prefix)})


def open_clip_text(p: dict[str, Tensor], ids: Tensor, heads: int) -> Tensor:
    n_ctx = ids.shape[1]
    x = p["token_embedding.weight"][ids] + p["positional_embedding"][:n_ctx]
    x = x.transpose(0, 1)  # (L, N, D): OpenCLIP's sequence-first layout
    mask = torch.full((n_ctx, n_ctx), float("-inf")).triu(1)
    for i in range(_layers(p, "transformer.resblocks.")):
        x = _oc_resblock(x, p, f"transformer.resblocks.{i}.", heads, mask)
    x = _ln(x.transpose(0, 1), p, "ln_final", 1e-5)
    return x[torch.arange(x.shape[0]), ids.argmax(dim=-1)] @ p["text_projection"]


def open_clip_image(p: dict[str, Tensor], pixels: Tensor, heads: int) -> Tensor:
    w = p["visual.conv1.weight"]
    x = F.conv2d(pixels, w, stride=w.shape[-1]).flatten(2).transpose(1, 2)
    cls = p["visual.class_embedding"].expand(x.shape[0], 1, -1)
    x = torch.cat([cls, x], dim=1) + p["visual.positional_embedding"]
    x = _ln(x, p, "visual.ln_pre", 1e-5).transpose(0, 1)
    for i in range(_layers(p, "visual.transformer.resblocks.")):
        x = _oc_resblock(x, p, f"visual.transformer.resblocks.{i}.", heads, None)
    x = _ln(x.transpose(0, 1), p, "visual.ln_post", 1e-5)
    return x[:, 0] @ p["visual.proj"]


def tiny_open_clip(vocab: int, seed: int = 0) -> tuple[dict[str, Tensor], dict]:
    """A random OpenCLIP ViT state dict in the released key format, and its model config."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g) * 0.1  # noqa: E731
    vw, tw, embed, patch, size, ctx = 32, 32, 16, 8, 32, 77
    p: dict[str, Tensor] = {"token_embedding.weight": r(vocab, tw), "positional_embedding": r(ctx, tw)}

    def block(pre: str, d: int) -> None:
        for ln in ("ln_1", "ln_2"):
            p[f"{pre}{ln}.weight"], p[f"{pre}{ln}.bias"] = 1 + r(d), r(d)
        p[f"{pre}attn.in_proj_weight"], p[f"{pre}attn.in_proj_bias"] = r(3 * d, d), r(3 * d)
        p[f"{pre}attn.out_proj.weight"], p[f"{pre}attn.out_proj.bias"] = r(d, d), r(d)
        p[f"{pre}mlp.c_fc.weight"], p[f"{pre}mlp.c_fc.bias"] = r(4 * d, d), r(4 * d)
        p[f"{pre}mlp.c_proj.weight"], p[f"{pre}mlp.c_proj.bias"] = r(d, 4 * d), r(d)

    for i in range(2):
        block(f"transformer.resblocks.{i}.", tw)
        block(f"visual.transformer.resblocks.{i}.", vw)
    p["ln_final.weight"], p["ln_final.bias"] = 1 + r(tw), r(tw)
    p["text_projection"] = r(tw, embed)
    p["visual.conv1.weight"] = r(vw, 3, patch, patch)
    p["visual.class_embedding"] = r(vw)
    p["visual.positional_embedding"] = r((size // patch) ** 2 + 1, vw)
    for ln in ("visual.ln_pre", "visual.ln_post"):
        p[f"{ln}.weight"], p[f"{ln}.bias"] = 1 + r(vw), r(vw)
    p["visual.proj"] = r(vw, embed)
    p["logit_scale"] = torch.tensor(4.6052)
    config = {"embed_dim": embed, "vision_cfg": {"image_size": size, "layers": 2, "width": vw, "head_width": 16,
                                                 "patch_size": patch},
              "text_cfg": {"context_length": ctx, "vocab_size": vocab, "width": tw, "heads": 2, "layers": 2}}
    return p, config


# -- BLIP / ImageReward -------------------------------------------------------------------------------------
def _heads_split(x: Tensor, heads: int) -> Tensor:
    n, L, d = x.shape
    return x.view(n, L, heads, d // heads).transpose(1, 2)


def _attention(q: Tensor, k: Tensor, v: Tensor, heads: int, key_mask: Tensor | None) -> Tensor:
    q, k, v = (_heads_split(t, heads) for t in (q, k, v))
    scores = q @ k.transpose(-1, -2) / (q.shape[-1] ** 0.5)
    if key_mask is not None:
        scores = scores + (1.0 - key_mask[:, None, None, :].float()) * -10000.0  # BERT's extended mask
    out = scores.softmax(-1) @ v
    return out.transpose(1, 2).reshape(q.shape[0], q.shape[2], -1)


def blip_vit(p: dict[str, Tensor], pixels: Tensor, heads: int) -> Tensor:
    pre = "blip.visual_encoder."
    x = F.conv2d(pixels, p[pre + "patch_embed.proj.weight"], p[pre + "patch_embed.proj.bias"],
                 stride=p[pre + "patch_embed.proj.weight"].shape[-1]).flatten(2).transpose(1, 2)
    x = torch.cat([p[pre + "cls_token"].expand(x.shape[0], -1, -1), x], dim=1) + p[pre + "pos_embed"]
    for i in range(_layers(p, pre + "blocks.")):
        b = f"{pre}blocks.{i}."
        h = _ln(x, p, b + "norm1", 1e-6)
        q, k, v = _lin(h, p, b + "attn.qkv").chunk(3, dim=-1)
        x = x + _lin(_attention(q, k, v, heads, None), p, b + "attn.proj")
        h = _ln(x, p, b + "norm2", 1e-6)
        x = x + _lin(F.gelu(_lin(h, p, b + "mlp.fc1")), p, b + "mlp.fc2")
    return _ln(x, p, pre + "norm", 1e-6)


def blip_text_cls(p: dict[str, Tensor], ids: Tensor, mask: Tensor, image: Tensor, heads: int) -> Tensor:
    pre = "blip.text_encoder."
    x = p[pre + "embeddings.word_embeddings.weight"][ids] + p[pre + "embeddings.position_embeddings.weight"][
        : ids.shape[1]]
    x = _ln(x, p, pre + "embeddings.LayerNorm", 1e-12)
    for i in range(_layers(p, pre + "encoder.layer.")):
        b = f"{pre}encoder.layer.{i}."
        for kind, kv, m in (("attention", x, mask), ("crossattention", image, None)):
            q, k, v = (_lin(src, p, f"{b}{kind}.self.{n}") for src, n in ((x, "query"), (kv, "key"), (kv, "value")))
            a = _lin(_attention(q, k, v, heads, m), p, f"{b}{kind}.output.dense")
            x = _ln(a + x, p, f"{b}{kind}.output.LayerNorm", 1e-12)
        h = F.gelu(_lin(x, p, b + "intermediate.dense"))
        x = _ln(_lin(h, p, b + "output.dense") + x, p, b + "output.LayerNorm", 1e-12)
    return x[:, 0]


def image_reward(p: dict[str, Tensor], pixels: Tensor, ids: Tensor, mask: Tensor, v_heads: int, t_heads: int
                 ) -> Tensor:
    h = blip_text_cls(p, ids, mask, blip_vit(p, pixels, v_heads), t_heads)
    for i in (0, 2, 4, 6):
        h = _lin(h, p, f"mlp.layers.{i}")  # the MLP has no activations, only dropout between its layers
    raw = _lin(h, p, "mlp.layers.7").squeeze(-1)
    return (raw - 0.16717362830052426) / 1.0333394966054072


def tiny_image_reward(vocab: int, seed: int = 0) -> tuple[dict[str, Tensor], dict]:
    """A random ImageReward state dict in the released key format (BLIP ViT + med BERT + MLP), and its
    ``med_config.json``."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g) * 0.1  # noqa: E731
    vw, tw, patch, size = 128, 32, 8, 32
    p: dict[str, Tensor] = {}
    v = "blip.visual_encoder."
    p[v + "cls_token"], p[v + "pos_embed"] = r(1, 1, vw), r(1, (size // patch) ** 2 + 1, vw)
    p[v + "patch_embed.proj.weight"], p[v + "patch_embed.proj.bias"] = r(vw, 3, patch, patch), r(vw)
    for i in range(2):
        b = f"{v}blocks.{i}."
        for n, shape in (("norm1", None), ("norm2", None), ("attn.qkv", (3 * vw, vw)), ("attn.proj", (vw, vw)),
                         ("mlp.fc1", (4 * vw, vw)), ("mlp.fc2", (vw, 4 * vw))):
            p[f"{b}{n}.weight"] = 1 + r(vw) if shape is None else r(*shape)
            p[f"{b}{n}.bias"] = r(vw if shape is None else shape[0])
    p[v + "norm.weight"], p[v + "norm.bias"] = 1 + r(vw), r(vw)
    t = "blip.text_encoder."
    p[t + "embeddings.word_embeddings.weight"] = r(vocab, tw)
    p[t + "embeddings.position_embeddings.weight"] = r(64, tw)
    p[t + "embeddings.LayerNorm.weight"], p[t + "embeddings.LayerNorm.bias"] = 1 + r(tw), r(tw)
    p[t + "embeddings.position_ids"] = torch.arange(64)[None]
    for i in range(2):
        b = f"{t}encoder.layer.{i}."
        for kind, kv in (("attention", tw), ("crossattention", vw)):
            p[f"{b}{kind}.self.query.weight"], p[f"{b}{kind}.self.query.bias"] = r(tw, tw), r(tw)
            for n in ("key", "value"):
                p[f"{b}{kind}.self.{n}.weight"], p[f"{b}{kind}.self.{n}.bias"] = r(tw, kv), r(tw)
            p[f"{b}{kind}.output.dense.weight"], p[f"{b}{kind}.output.dense.bias"] = r(tw, tw), r(tw)
            p[f"{b}{kind}.output.LayerNorm.weight"], p[f"{b}{kind}.output.LayerNorm.bias"] = 1 + r(tw), r(tw)
        p[b + "intermediate.dense.weight"], p[b + "intermediate.dense.bias"] = r(4 * tw, tw), r(4 * tw)
        p[b + "output.dense.weight"], p[b + "output.dense.bias"] = r(tw, 4 * tw), r(tw)
        p[b + "output.LayerNorm.weight"], p[b + "output.LayerNorm.bias"] = 1 + r(tw), r(tw)
    p["blip.vision_proj.weight"], p["blip.vision_proj.bias"] = r(16, vw), r(16)
    p["blip.text_proj.weight"], p["blip.text_proj.bias"] = r(16, tw), r(16)
    for i, (o, n) in zip((0, 2, 4, 6, 7), ((1024, tw), (128, 1024), (64, 128), (16, 64), (1, 16)), strict=True):
        p[f"mlp.layers.{i}.weight"], p[f"mlp.layers.{i}.bias"] = r(o, n), r(o)
    med = {"hidden_size": tw, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 4 * tw,
           "max_position_embeddings": 64, "layer_norm_eps": 1e-12, "vocab_size": vocab, "add_cross_attention": True,
           "encoder_width": vw}
    return p, med
