"""ImageReward and HPSv2 rebuilt on transformers classes from their released checkpoints.

Neither original package can be used here: ``image-reward`` fails to import with transformers 5, and HPSv2
needs ``open_clip_torch``, which pulls torchvision (another torch build). Both architectures exist in
transformers, so each released checkpoint is renamed onto them (keys converted one by one; a key that is
not converted and not known to be unused is an error, as in diffusers' converters).

**HPSv2** (Wu et al., 2023, arXiv:2306.09341) is an OpenCLIP ViT-H-14 fine-tuned on human preferences; its
score is the cosine of the normalised image and text embeddings (``hpsv2.img_score``: the diagonal of
``image_features @ text_features.T``, no logit scale). OpenCLIP → ``CLIPModel`` mapping:

| OpenCLIP key | transformers key |
|---|---|
| ``token_embedding.weight`` / ``positional_embedding`` | ``text_model.embeddings.token_embedding.weight`` / ``…position_embedding.weight`` |
| ``transformer.resblocks.N.ln_1`` / ``ln_2`` | ``text_model.encoder.layers.N.layer_norm1`` / ``layer_norm2`` |
| ``….attn.in_proj_weight`` / ``in_proj_bias`` (q, k, v stacked) | ``….self_attn.{q,k,v}_proj.weight`` / ``.bias`` (split in three) |
| ``….attn.out_proj`` / ``mlp.c_fc`` / ``mlp.c_proj`` | ``….self_attn.out_proj`` / ``mlp.fc1`` / ``mlp.fc2`` |
| ``ln_final`` / ``text_projection`` (``width × embed``) | ``text_model.final_layer_norm`` / ``text_projection.weight`` (transposed) |
| ``visual.conv1.weight`` / ``visual.class_embedding`` / ``visual.positional_embedding`` | ``vision_model.embeddings.patch_embedding.weight`` / ``class_embedding`` / ``position_embedding.weight`` |
| ``visual.ln_pre`` / ``visual.ln_post`` / ``visual.proj`` | ``vision_model.pre_layrnorm`` / ``post_layernorm`` / ``visual_projection.weight`` (transposed) |
| ``visual.transformer.resblocks.N.*`` | ``vision_model.encoder.layers.N.*`` (as for the text tower) |
| ``logit_scale`` | ``logit_scale`` |

The architecture comes from an OpenCLIP model config (``open_clip_config.json`` beside the checkpoint, the
format of OpenCLIP's ``model_configs/*.json``), by default ViT-H-14's. Tokenizer and image preprocessing
come from a transformers CLIP processor directory (OpenCLIP's tokenizer is CLIP's BPE; its ViT-H-14
preprocessing is CLIP's resize-224 / centre-crop / OpenAI mean and std).

**ImageReward** (Xu et al., 2023, arXiv:2304.05977) is BLIP: a ViT-L/16 image encoder, a BERT text encoder
with cross-attention to the image tokens (BLIP's ``med.py``) and a 5-layer MLP on the ``[CLS]`` output; the
reward is ``(mlp(h_cls) − 0.16717362830052426) / 1.0333394966054072`` (``ImageReward.score``), text
tokenised by bert-base-uncased to 35 tokens. BLIP → ``BlipVisionModel`` / ``BlipTextModel`` mapping:

| ImageReward key | transformers key |
|---|---|
| ``blip.visual_encoder.cls_token`` / ``pos_embed`` / ``patch_embed.proj`` | ``vision.embeddings.class_embedding`` / ``position_embedding`` / ``patch_embedding`` |
| ``blip.visual_encoder.blocks.N.norm1`` / ``norm2`` | ``vision.encoder.layers.N.layer_norm1`` / ``layer_norm2`` |
| ``….attn.qkv`` / ``attn.proj`` / ``mlp.fc1`` / ``mlp.fc2`` | ``….self_attn.qkv`` / ``self_attn.projection`` / ``mlp.fc1`` / ``mlp.fc2`` |
| ``blip.visual_encoder.norm`` | ``vision.post_layernorm`` |
| ``blip.text_encoder.embeddings.*`` / ``blip.text_encoder.encoder.layer.N.*`` | ``text.embeddings.*`` / ``text.encoder.layer.N.*`` (same names) |
| ``mlp.layers.{0,2,4,6,7}`` | ``head.layers.{0,2,4,6,7}`` |
| ``blip.vision_proj``, ``blip.text_proj``, ``…position_ids`` | unused by the score (dropped) |

Weights are read from ``.safetensors`` directly; a pickled ``.pt`` (as both projects release) only with
``allow_pickle`` and ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from calibration.scorers import ScorerError

if TYPE_CHECKING:
    import torch
    from PIL import Image

IMAGEREWARD_MEAN = 0.16717362830052426
IMAGEREWARD_STD = 1.0333394966054072
IMAGEREWARD_MAX_TOKENS = 35
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
# OpenCLIP's model_configs/ViT-H-14.json (the HPSv2 architecture)
VIT_H_14 = {
    "embed_dim": 1024,
    "vision_cfg": {"image_size": 224, "layers": 32, "width": 1280, "head_width": 80, "patch_size": 14},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 1024, "heads": 16, "layers": 24},
}
# BLIP's configs/med_config.json, as ImageReward ships it
BLIP_MED = {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072,
            "max_position_embeddings": 512, "layer_norm_eps": 1e-12, "vocab_size": 30524, "hidden_act": "gelu",
            "pad_token_id": 0}


class ConversionError(ScorerError):
    """A checkpoint that cannot be read or renamed onto the transformers architecture."""


def read_state_dict(path: Path, allow_pickle: bool) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` file, or of a ``.pt``/``.pth``/``.bin`` only with ``allow_pickle``
    (``weights_only=True``); a ``{"state_dict": …}`` wrapper and DDP's ``module.`` prefix are removed."""
    import torch

    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            state: Any = load_file(str(path))
        except Exception as exc:  # safetensors raises SafetensorError / OSError
            raise ConversionError(f"cannot read {path}: {exc}") from exc
    else:
        if not allow_pickle:
            raise ConversionError(f"{path.name} is a pickle; set DIFFGRAPH_ALLOW_PICKLE=1 to load it "
                                  "(read with torch.load(weights_only=True))")
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as exc:  # UnpicklingError for anything beyond tensors and containers
            raise ConversionError(f"cannot read {path} with weights_only=True: {exc}") from exc
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConversionError(f"{path} does not hold a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def _layers(state: dict[str, Any], prefix: str) -> int:
    found = {int(m.group(1)) for k in state if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))}
    return max(found) + 1 if found else 0


def _leftovers(state: dict[str, Any], used: set[str], what: str) -> None:
    left = sorted(set(state) - used)
    if left:
        raise ConversionError(f"{what}: {len(left)} unexpected keys, e.g. {', '.join(left[:3])}")


# -- HPSv2: OpenCLIP -> transformers CLIPModel ----------------------------------------------------------------
def _block(src: str, dst: str, state: dict[str, Any], out: dict[str, Any], used: set[str]) -> None:
    def take(key: str) -> Any:
        used.add(src + key)
        return state[src + key]

    for a, b in (("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"), ("attn.out_proj", "self_attn.out_proj"),
                 ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")):
        out[f"{dst}{b}.weight"] = take(f"{a}.weight")
        out[f"{dst}{b}.bias"] = take(f"{a}.bias")
    for suffix in ("weight", "bias"):
        q, k, v = take(f"attn.in_proj_{suffix}").chunk(3, dim=0)
        for name, t in (("q", q), ("k", k), ("v", v)):
            out[f"{dst}self_attn.{name}_proj.{suffix}"] = t.contiguous()


def convert_open_clip_to_transformers(state: dict[str, torch.Tensor], oc_config: dict[str, Any]
                                      ) -> tuple[Any, dict[str, torch.Tensor]]:
    """``(CLIPConfig, state dict)`` for ``transformers.CLIPModel`` from an OpenCLIP ViT state dict."""
    from transformers import CLIPConfig

    try:
        vis, txt = oc_config["vision_cfg"], oc_config["text_cfg"]
        out: dict[str, Any] = {}
        used: set[str] = {"attn_mask", "visual.attn_mask"}

        def take(key: str) -> Any:
            used.add(key)
            return state[key]

        out["text_model.embeddings.token_embedding.weight"] = take("token_embedding.weight")
        out["text_model.embeddings.position_embedding.weight"] = take("positional_embedding")
        for i in range(_layers(state, "transformer.resblocks.")):
            _block(f"transformer.resblocks.{i}.", f"text_model.encoder.layers.{i}.", state, out, used)
        out["text_model.final_layer_norm.weight"] = take("ln_final.weight")
        out["text_model.final_layer_norm.bias"] = take("ln_final.bias")
        out["text_projection.weight"] = take("text_projection").t().contiguous()
        out["vision_model.embeddings.patch_embedding.weight"] = take("visual.conv1.weight")
        out["vision_model.embeddings.class_embedding"] = take("visual.class_embedding")
        out["vision_model.embeddings.position_embedding.weight"] = take("visual.positional_embedding")
        out["vision_model.pre_layrnorm.weight"] = take("visual.ln_pre.weight")
        out["vision_model.pre_layrnorm.bias"] = take("visual.ln_pre.bias")
        for i in range(_layers(state, "visual.transformer.resblocks.")):
            _block(f"visual.transformer.resblocks.{i}.", f"vision_model.encoder.layers.{i}.", state, out, used)
        out["vision_model.post_layernorm.weight"] = take("visual.ln_post.weight")
        out["vision_model.post_layernorm.bias"] = take("visual.ln_post.bias")
        out["visual_projection.weight"] = take("visual.proj").t().contiguous()
        out["logit_scale"] = take("logit_scale")
    except KeyError as exc:
        raise ConversionError(f"not an OpenCLIP ViT checkpoint: missing {exc}") from None
    _leftovers(state, used, "OpenCLIP checkpoint")
    v_width, t_width = int(vis["width"]), int(txt["width"])
    config = CLIPConfig(
        text_config={
            "vocab_size": int(out["text_model.embeddings.token_embedding.weight"].shape[0]),
            "hidden_size": t_width, "num_hidden_layers": _layers(state, "transformer.resblocks."),
            "num_attention_heads": int(txt.get("heads", 8)),
            "intermediate_size": int(out["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0]),
            "max_position_embeddings": int(txt.get("context_length", 77)), "hidden_act": "gelu",
            # eos_token_id 2 selects transformers' legacy pooling at argmax(input_ids), which is OpenCLIP's
            # (its end-of-text token has the largest id), whatever the tokenizer's size
            "layer_norm_eps": 1e-5, "bos_token_id": 49406, "eos_token_id": 2,
        },
        vision_config={
            "hidden_size": v_width, "num_hidden_layers": _layers(state, "visual.transformer.resblocks."),
            "num_attention_heads": v_width // int(vis.get("head_width", 64)),
            "intermediate_size": int(out["vision_model.encoder.layers.0.mlp.fc1.weight"].shape[0]),
            "image_size": int(vis["image_size"]), "patch_size": int(vis["patch_size"]), "hidden_act": "gelu",
            "layer_norm_eps": 1e-5,
        },
        projection_dim=int(oc_config.get("embed_dim", out["visual_projection.weight"].shape[0])),
    )
    return config, out


class HPSv2Scorer:
    """HPSv2: cosine of the image and text embeddings of its (converted) OpenCLIP ViT-H-14."""

    def __init__(self, checkpoint: Path, processor_dir: Path, device: str, allow_pickle: bool,
                 version: str) -> None:
        from transformers import CLIPModel, CLIPProcessor

        config_file = checkpoint.parent / "open_clip_config.json"
        oc_config = json.loads(config_file.read_text()) if config_file.is_file() else VIT_H_14
        config, state = convert_open_clip_to_transformers(read_state_dict(checkpoint, allow_pickle), oc_config)
        model = CLIPModel(config)
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.endswith("position_ids")]
        if missing or unexpected:
            raise ConversionError(f"HPSv2 conversion left keys: missing {missing[:3]}, unexpected {unexpected[:3]}")
        try:
            self.processor = CLIPProcessor.from_pretrained(str(processor_dir), local_files_only=True)
        except Exception as exc:  # transformers raises OSError/ValueError variously
            raise ConversionError(f"cannot load a CLIP processor from {processor_dir}: {exc}") from exc
        self.model = model.to(device).eval()
        self.device = device
        self.name = "hpsv2"
        self.version = version
        self._lock = threading.Lock()

    def embeddings(self, pixels: torch.Tensor, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        import torch

        with torch.inference_mode():
            img = self.model.get_image_features(pixel_values=pixels.to(self.device))
            txt = self.model.get_text_features(input_ids=input_ids.to(self.device))
        img = getattr(img, "pooler_output", img)
        txt = getattr(txt, "pooler_output", txt)
        return (torch.nn.functional.normalize(img.float(), dim=-1),
                torch.nn.functional.normalize(txt.float(), dim=-1))

    def score(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> list[float]:
        if not images:
            return []
        n_ctx = int(self.model.config.text_config.max_position_embeddings)
        with self._lock:
            pixels = self.processor(images=[im.convert("RGB") for im in images], return_tensors="pt")["pixel_values"]
            ids = self.processor.tokenizer(list(prompts), padding="max_length", truncation=True, max_length=n_ctx,
                                           return_tensors="pt")["input_ids"]
            img, txt = self.embeddings(pixels, ids)
        return [float(x) for x in (img * txt).sum(-1)]


# -- ImageReward: BLIP -> transformers BlipVisionModel + BlipTextModel ----------------------------------------
_VIT_BLOCK = {"norm1": "layer_norm1", "norm2": "layer_norm2", "attn.qkv": "self_attn.qkv",
              "attn.proj": "self_attn.projection", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
_IR_UNUSED = re.compile(r"^blip\.(vision_proj|text_proj)\.|position_ids$")


def convert_imagereward_to_transformers(state: dict[str, torch.Tensor], med_config: dict[str, Any]
                                        ) -> tuple[Any, Any, dict[str, torch.Tensor]]:
    """``(BlipVisionConfig, BlipTextConfig, state dict)`` with keys ``vision.*``, ``text.*``, ``head.*``."""
    from transformers import BlipTextConfig, BlipVisionConfig

    out: dict[str, Any] = {}
    used = {k for k in state if _IR_UNUSED.search(k)}
    try:
        vit = "blip.visual_encoder."

        def take(key: str) -> Any:
            used.add(key)
            return state[key]

        out["vision.embeddings.class_embedding"] = take(vit + "cls_token")
        out["vision.embeddings.position_embedding"] = take(vit + "pos_embed")
        out["vision.embeddings.patch_embedding.weight"] = take(vit + "patch_embed.proj.weight")
        out["vision.embeddings.patch_embedding.bias"] = take(vit + "patch_embed.proj.bias")
        depth = _layers(state, vit + "blocks.")
        for i in range(depth):
            for a, b in _VIT_BLOCK.items():
                for s in ("weight", "bias"):
                    out[f"vision.encoder.layers.{i}.{b}.{s}"] = take(f"{vit}blocks.{i}.{a}.{s}")
        out["vision.post_layernorm.weight"] = take(vit + "norm.weight")
        out["vision.post_layernorm.bias"] = take(vit + "norm.bias")
        for key in [k for k in state if k.startswith("blip.text_encoder.") and k not in used]:
            out["text." + key.removeprefix("blip.text_encoder.")] = take(key)
        for i in (0, 2, 4, 6, 7):
            for s in ("weight", "bias"):
                out[f"head.layers.{i}.{s}"] = take(f"mlp.layers.{i}.{s}")
    except KeyError as exc:
        raise ConversionError(f"not an ImageReward checkpoint: missing {exc}") from None
    _leftovers(state, used, "ImageReward checkpoint")
    width = int(out["vision.embeddings.patch_embedding.weight"].shape[0])
    patch = int(out["vision.embeddings.patch_embedding.weight"].shape[-1])
    grid = int(round((out["vision.embeddings.position_embedding"].shape[1] - 1) ** 0.5))
    vision = BlipVisionConfig(
        hidden_size=width, num_hidden_layers=depth, num_attention_heads=max(1, width // 64),
        intermediate_size=int(out["vision.encoder.layers.0.mlp.fc1.weight"].shape[0]), image_size=patch * grid,
        patch_size=patch, hidden_act="gelu", layer_norm_eps=1e-6,
    )
    med = {**BLIP_MED, **{k: v for k, v in med_config.items() if k in BLIP_MED}}
    text = BlipTextConfig(**med, encoder_hidden_size=width, is_decoder=True)  # is_decoder builds cross-attention
    return vision, text, out


class ImageRewardScorer:
    """ImageReward's score from its released checkpoint, on transformers' BLIP classes (see module docs)."""

    def __init__(self, checkpoint: Path, tokenizer_dir: Path, device: str, allow_pickle: bool, version: str
                 ) -> None:
        from torch import nn
        from transformers import BertTokenizer, BlipTextModel, BlipVisionModel, CLIPImageProcessor

        from calibration.scorers import AestheticMLP

        med_file = checkpoint.parent / "med_config.json"
        med = json.loads(med_file.read_text()) if med_file.is_file() else {}
        vision_cfg, text_cfg, state = convert_imagereward_to_transformers(read_state_dict(checkpoint, allow_pickle),
                                                                          med)
        model = nn.Module()
        model.vision = BlipVisionModel(vision_cfg)
        model.text = BlipTextModel(text_cfg, add_pooling_layer=False)
        model.head = AestheticMLP(int(text_cfg.hidden_size))  # ImageReward's MLP has the same layers
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.endswith("position_ids")]
        if missing or unexpected:
            raise ConversionError(f"ImageReward conversion left keys: missing {missing[:3]}, "
                                  f"unexpected {unexpected[:3]}")
        try:
            self.tokenizer = BertTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
        except Exception as exc:  # transformers raises OSError/ValueError variously
            raise ConversionError(f"cannot load the bert-base-uncased tokenizer from {tokenizer_dir}: {exc}") from exc
        # BLIP's init_tokenizer adds these two tokens (vocabulary 30522 -> 30524)
        self.tokenizer.add_special_tokens({"bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"]})
        size = int(vision_cfg.image_size)
        self.processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                                            image_mean=list(OPENAI_MEAN), image_std=list(OPENAI_STD))
        self.model = model.to(device).eval()
        self.device = device
        self.name = "imagereward"
        self.version = version
        self._lock = threading.Lock()

    def reward(self, pixels: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        import torch

        with torch.inference_mode():
            image_embeds = self.model.vision(pixel_values=pixels.to(self.device)).last_hidden_state
            image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=self.device)
            hidden = self.model.text(input_ids=input_ids.to(self.device), attention_mask=attention_mask.to(self.device),
                                     encoder_hidden_states=image_embeds, encoder_attention_mask=image_atts,
                                     ).last_hidden_state
            raw = self.model.head(hidden[:, 0, :].float()).squeeze(-1)
        return (raw - IMAGEREWARD_MEAN) / IMAGEREWARD_STD

    def score(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> list[float]:
        if not images:
            return []
        with self._lock:
            pixels = self.processor(images=[im.convert("RGB") for im in images], return_tensors="pt")["pixel_values"]
            tok = self.tokenizer(list(prompts), padding="max_length", truncation=True,
                                 max_length=IMAGEREWARD_MAX_TOKENS, return_tensors="pt")
            rewards = self.reward(pixels, tok["input_ids"], tok["attention_mask"])
        return [float(x) for x in rewards]
