"""Scorers trained on the world: the attribute reader (adherence) and a small CLIP (CLIP score).

``adherence`` = the fraction of the prompt's attributes (shape, colour, background, style, as far as the
prompt names them) that the reader sees in the image. Both are registered in calibration's scorer registry as
``world-adherence`` and ``world-clip``.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from functools import cache
from typing import TYPE_CHECKING, Any

import torch

from world import grammar, models, paths
from world.integrity import verified

if TYPE_CHECKING:
    from PIL import Image

_LOCK = threading.Lock()


@cache
def _reader() -> models.Reader:
    from safetensors.torch import load_file

    reader = models.Reader()
    state = load_file(str(verified(paths.reader_path())))
    reader.load_state_dict({k: v.float() for k, v in state.items()})
    return reader.eval()


@cache
def _clip() -> tuple[Any, Any]:
    from transformers import CLIPModel, CLIPTokenizer

    folder = paths.clip_dir()
    verified(folder / "model.safetensors")
    model = CLIPModel.from_pretrained(str(folder), dtype=torch.float32).eval()
    return model, CLIPTokenizer.from_pretrained(str(folder))


@torch.no_grad()
def read(images: Sequence[Image.Image]) -> list[dict[str, str]]:
    """The attributes the reader sees in each image."""
    if not images:
        return []
    with _LOCK:
        out = _reader()(models.to_tensor(list(images)))
    return [{a: grammar.VALUES[a][int(out[a][i].argmax())] for a in grammar.ATTRIBUTES} for i in range(len(images))]


def adherence(images: Sequence[Image.Image], prompts: Sequence[str]) -> list[float]:
    """Fraction of each prompt's attributes that its image shows (0.0 for a prompt naming none)."""
    if len(images) != len(prompts):
        raise ValueError("adherence needs one prompt per image")
    scores = []
    for seen, prompt in zip(read(images), prompts, strict=True):
        wanted = grammar.parse(prompt)
        scores.append(sum(seen[a] == v for a, v in wanted.items()) / len(wanted) if wanted else 0.0)
    return scores


@torch.no_grad()
def clip_score(images: Sequence[Image.Image], prompts: Sequence[str]) -> list[float]:
    """CLIPScore-style ``100 · max(cos(image, text), 0)`` with the world's CLIP."""
    if len(images) != len(prompts):
        raise ValueError("clip_score needs one prompt per image")
    if not images:
        return []
    with _LOCK:
        model, tok = _clip()
        enc = tok(list(prompts), padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt")
        img = model.get_image_features(pixel_values=models.to_tensor(list(images)))
        txt = model.get_text_features(input_ids=enc.input_ids, attention_mask=enc.attention_mask)
    img = getattr(img, "pooler_output", img)
    txt = getattr(txt, "pooler_output", txt)
    cos = torch.nn.functional.cosine_similarity(img, txt, dim=-1)
    return [float(100 * max(c, 0.0)) for c in cos.tolist()]
