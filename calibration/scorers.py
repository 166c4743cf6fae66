"""Image scorers used by calibration, each loaded from a local path in ``settings.scorer_paths``.

Registry (``settings.scorer_paths`` key → what it must point at):

* ``clip`` — a transformers CLIP directory (``CLIPModel`` + ``CLIPProcessor``). Score: CLIPScore-style
  ``100 · cos(image, text)``.
* ``aesthetic`` — the LAION "improved aesthetic predictor" MLP head as a ``.safetensors`` file (keys
  ``layers.{0,2,4,6,7}.{weight,bias}``) applied to the L2-normalised CLIP image embedding of the CLIP model at
  ``scorer_paths["aesthetic_clip"]`` (default: ``scorer_paths["clip"]``). Its input size must equal that
  CLIP's projection dim (768 for ViT-L/14).
* ``pickscore`` — PickScore as a transformers CLIP directory. Score: ``logit_scale · cos(image, text)``.
* ``hpsv2`` — the released OpenCLIP checkpoint (``HPS_v2_compressed.pt`` / ``HPS_v2.1_compressed.pt``, or a
  ``.safetensors`` of it), renamed onto ``transformers.CLIPModel`` at load time
  (:mod:`calibration.reward_models`), with the CLIP processor at ``scorer_paths["hpsv2_processor"]``
  (default ``scorer_paths["clip"]``); or an already converted transformers CLIP directory. Score: HPSv2's
  ``cos(image, text)``.
* ``imagereward`` — the released ``ImageReward.pt`` (or a ``.safetensors`` of it) with BLIP's
  ``med_config.json`` beside it, rebuilt on transformers' BLIP classes (:mod:`calibration.reward_models`);
  the bert-base-uncased tokenizer directory at ``scorer_paths["imagereward_tokenizer"]`` (default
  ``tokenizer/`` beside the checkpoint). Nothing is downloaded at run time.

A ``.pt`` checkpoint is a pickle: it is read only with ``allow_pickle`` and ``torch.load(weights_only=True)``.

A scorer whose path is unset, missing, or unusable is returned as ``Unavailable(name, reason)``: it is
reported, never skipped silently and never replaced by a fake score.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from core.settings import Settings
from core.types import DiffGraphError

if TYPE_CHECKING:
    import torch
    from PIL import Image

SCORER_NAMES = ("clip", "aesthetic", "imagereward", "hpsv2", "pickscore", "world-adherence", "world-clip")
_HASH_CHUNK = 1 << 20


class ScorerError(DiffGraphError):
    """A scorer's weights exist but cannot be loaded or used."""


class Scorer(Protocol):
    name: str
    version: str  # "<name>:<hash prefix of its weight files>"

    def score(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> list[float]:
        """One score per (image, prompt) pair; higher is better."""


@dataclass(frozen=True)
class Unavailable:
    name: str
    reason: str

    def __str__(self) -> str:
        return f"{self.name}: unavailable ({self.reason})"


def _aesthetic_layers(input_dim: int) -> Any:
    import torch.nn as nn

    return nn.Sequential(
        nn.Linear(input_dim, 1024), nn.Dropout(0.2),
        nn.Linear(1024, 128), nn.Dropout(0.2),
        nn.Linear(128, 64), nn.Dropout(0.1),
        nn.Linear(64, 16),
        nn.Linear(16, 1),
    )


def AestheticMLP(input_dim: int) -> Any:  # noqa: N802 - reads like the class it builds
    """The LAION improved-aesthetic-predictor head; ``state_dict`` keys are ``layers.N.*`` as in the original."""
    import torch.nn as nn

    class _Head(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = _aesthetic_layers(input_dim)

        def forward(self, x: Any) -> Any:
            return self.layers(x)

    return _Head()


# -- weight fingerprints ------------------------------------------------------------------------------
_hash_cache: dict[tuple[str, int, int], str] = {}


def _file_sha256(path: Path) -> str:
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _hash_cache:
        h = hashlib.sha256()
        with path.open("rb") as fh:
            while chunk := fh.read(_HASH_CHUNK):
                h.update(chunk)
        _hash_cache[key] = h.hexdigest()
    return _hash_cache[key]


def weights_hash(path: Path) -> str:
    """SHA-256 over a weight file, or over a directory's files (names and contents, sorted)."""
    if path.is_file():
        return _file_sha256(path)
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")):
        h.update(str(f.relative_to(path)).encode())
        h.update(_file_sha256(f).encode())
    return h.hexdigest()


def scorer_version(scorers: dict[str, Scorer | Unavailable]) -> str:
    """``"aesthetic:1a2b3c4d+clip:5e6f7a8b"``: the available scorers with their weight hashes, sorted."""
    return "+".join(sorted(s.version for s in scorers.values() if not isinstance(s, Unavailable)))


# -- CLIP-family scorers --------------------------------------------------------------------------------
def _device(settings: Settings) -> str:
    return settings.resolved_device()


@dataclass
class _ClipBundle:
    model: Any
    processor: Any
    device: str
    lock: threading.Lock

    def image_embeds(self, images: Sequence[Image.Image]) -> torch.Tensor:
        import torch

        pixels = self.processor(images=list(images), return_tensors="pt")["pixel_values"].to(self.device)
        with torch.inference_mode():
            pooled = self.model.vision_model(pixel_values=pixels).pooler_output
            emb = self.model.visual_projection(pooled)
        return torch.nn.functional.normalize(emb.float(), dim=-1)

    def text_embeds(self, prompts: Sequence[str]) -> torch.Tensor:
        import torch

        max_len = int(self.model.config.text_config.max_position_embeddings)
        tok = self.processor.tokenizer(list(prompts), padding=True, truncation=True, max_length=max_len,
                                       return_tensors="pt").to(self.device)
        with torch.inference_mode():
            pooled = self.model.text_model(input_ids=tok["input_ids"],
                                           attention_mask=tok["attention_mask"]).pooler_output
            emb = self.model.text_projection(pooled)
        return torch.nn.functional.normalize(emb.float(), dim=-1)


_clip_cache: dict[tuple[str, str, str], _ClipBundle] = {}
_cache_lock = threading.Lock()


def _load_clip_bundle(path: Path, device: str) -> _ClipBundle:
    """A CLIP model + processor from a local directory (never the hub), cached per process."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    key = (str(path.resolve()), weights_hash(path), device)
    with _cache_lock:
        if key in _clip_cache:
            return _clip_cache[key]
        from transformers import CLIPModel, CLIPProcessor
        from transformers.utils import logging as hf_logging

        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # the torchvision-fallback notice is noise here
        try:
            model = CLIPModel.from_pretrained(str(path), local_files_only=True, use_safetensors=True)
            processor = CLIPProcessor.from_pretrained(str(path), local_files_only=True)
        except Exception as exc:  # transformers raises OSError/ValueError/KeyError variously
            raise ScorerError(f"cannot load CLIP weights from {path}: {exc}") from exc
        finally:
            hf_logging.set_verbosity(verbosity)
        bundle = _ClipBundle(model.to(device).eval(), processor, device, threading.Lock())
        _clip_cache[key] = bundle
        return bundle


class ClipScorer:
    """CLIPScore (``100 · cos``) or, with ``use_logit_scale``, the PickScore/HPS form ``logit_scale · cos``."""

    def __init__(self, name: str, path: Path, device: str, use_logit_scale: bool = False) -> None:
        self.name = name
        self.path = path
        self.bundle = _load_clip_bundle(path, device)
        self.version = f"{name}:{weights_hash(path)[:8]}"
        self._scale = float(self.bundle.model.logit_scale.exp().item()) if use_logit_scale else 100.0

    def score(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> list[float]:
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        if not images:
            return []
        with self.bundle.lock:
            img = self.bundle.image_embeds(images)
            txt = self.bundle.text_embeds(prompts)
        return [float(x) for x in (img * txt).sum(-1) * self._scale]


class AestheticScorer:
    """LAION improved aesthetic predictor: MLP head over the normalised CLIP image embedding."""

    def __init__(self, head_path: Path, clip_path: Path, device: str) -> None:
        import torch
        from safetensors.torch import load_file

        self.name = "aesthetic"
        self.bundle = _load_clip_bundle(clip_path, device)
        try:
            state = load_file(str(head_path))
        except Exception as exc:  # safetensors raises SafetensorError / OSError
            raise ScorerError(f"cannot read aesthetic head {head_path}: {exc}") from exc
        if "layers.0.weight" not in state:
            raise ScorerError(f"{head_path} is not an aesthetic-predictor head (no layers.0.weight)")
        in_dim = int(state["layers.0.weight"].shape[1])
        proj = int(self.bundle.model.config.projection_dim)
        if in_dim != proj:
            raise ScorerError(f"aesthetic head expects {in_dim}-d CLIP embeddings but {clip_path} projects to {proj}")
        head = AestheticMLP(in_dim)
        try:
            head.load_state_dict(state)
        except RuntimeError as exc:
            raise ScorerError(f"aesthetic head {head_path} does not match the LAION MLP: {exc}") from exc
        self.head = head.to(device).eval()
        self._torch = torch
        both = hashlib.sha256((weights_hash(head_path) + weights_hash(clip_path)).encode()).hexdigest()
        self.version = f"aesthetic:{both[:8]}"

    def score(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> list[float]:
        if not images:
            return []
        with self.bundle.lock, self._torch.inference_mode():
            emb = self.bundle.image_embeds(images)
            out = self.head(emb).squeeze(-1)
        return [float(x) for x in out]


# -- registry -----------------------------------------------------------------------------------------
def _path_or_reason(settings: Settings, key: str, want_dir: bool) -> Path | str:
    raw = settings.scorer_paths.get(key, "")
    if not raw:
        return f"no weights configured (set scorer_paths[{key!r}] / DIFFGRAPH_SCORER_PATHS)"
    path = Path(os.path.expanduser(raw))
    if not path.exists():
        return f"weights not found at {path}"
    if want_dir and not (path / "config.json").is_file():
        return f"{path} is not a transformers CLIP directory (no config.json)"
    if not want_dir and not path.is_file():
        return f"{path} is not a file"
    return path


def _load_clip(settings: Settings) -> Scorer | Unavailable:
    p = _path_or_reason(settings, "clip", want_dir=True)
    return Unavailable("clip", p) if isinstance(p, str) else ClipScorer("clip", p, _device(settings))


def _load_aesthetic(settings: Settings) -> Scorer | Unavailable:
    head = _path_or_reason(settings, "aesthetic", want_dir=False)
    if isinstance(head, str):
        return Unavailable("aesthetic", head)
    if head.suffix != ".safetensors":
        return Unavailable("aesthetic", f"{head} must be a .safetensors head (convert the .pth first)")
    clip_key = "aesthetic_clip" if settings.scorer_paths.get("aesthetic_clip") else "clip"
    clip = _path_or_reason(settings, clip_key, want_dir=True)
    if isinstance(clip, str):
        return Unavailable("aesthetic", f"needs a CLIP image encoder: {clip}")
    return AestheticScorer(head, clip, _device(settings))


def _load_pickscore(settings: Settings) -> Scorer | Unavailable:
    p = _path_or_reason(settings, "pickscore", want_dir=True)
    if isinstance(p, str):
        return Unavailable("pickscore", p)
    return ClipScorer("pickscore", p, _device(settings), use_logit_scale=True)


def _checkpoint_or_reason(settings: Settings, key: str) -> Path | str:
    """A checkpoint file for ``key``; a pickle without ``allow_pickle`` is a reason, not an error."""
    p = _path_or_reason(settings, key, want_dir=False)
    if isinstance(p, Path) and p.suffix != ".safetensors" and not settings.allow_pickle:
        return f"{p.name} is a pickle; set DIFFGRAPH_ALLOW_PICKLE=1 to load it (torch.load(weights_only=True))"
    return p


def _load_hpsv2(settings: Settings) -> Scorer | Unavailable:
    from calibration.reward_models import HPSv2Scorer

    raw = settings.scorer_paths.get("hpsv2", "")
    if raw and Path(os.path.expanduser(raw)).is_dir():  # an already converted transformers CLIP directory
        p = _path_or_reason(settings, "hpsv2", want_dir=True)
        if isinstance(p, str):
            return Unavailable("hpsv2", p)
        scorer = ClipScorer("hpsv2", p, _device(settings))
        scorer._scale = 1.0  # HPSv2's score is the plain cosine
        return scorer
    p = _checkpoint_or_reason(settings, "hpsv2")
    if isinstance(p, str):
        return Unavailable("hpsv2", p)
    proc_key = "hpsv2_processor" if settings.scorer_paths.get("hpsv2_processor") else "clip"
    proc = _path_or_reason(settings, proc_key, want_dir=True)
    if isinstance(proc, str):
        return Unavailable("hpsv2", f"needs a CLIP tokenizer/processor directory: {proc}")
    return HPSv2Scorer(p, proc, _device(settings), settings.allow_pickle, f"hpsv2:{weights_hash(p)[:8]}")


def _load_imagereward(settings: Settings) -> Scorer | Unavailable:
    from calibration.reward_models import ImageRewardScorer

    p = _checkpoint_or_reason(settings, "imagereward")
    if isinstance(p, str):
        return Unavailable("imagereward", p)
    tok = Path(os.path.expanduser(settings.scorer_paths.get("imagereward_tokenizer") or str(p.parent / "tokenizer")))
    if not (tok / "vocab.txt").is_file():
        return Unavailable("imagereward", f"needs the bert-base-uncased tokenizer (vocab.txt) at {tok} "
                                          "(scorer_paths['imagereward_tokenizer'])")
    return ImageRewardScorer(p, tok, _device(settings), settings.allow_pickle, f"imagereward:{weights_hash(p)[:8]}")


class WorldScorer:
    """The mini world's attribute adherence or CLIP score (``world.scorers``), for calibrating world experts."""

    def __init__(self, name: str, fn: Callable[[Sequence[Image.Image], Sequence[str]], list[float]], weights: Path):
        self.name, self._fn = name, fn
        self.version = f"{name}:{weights_hash(weights)[:8]}"

    def score(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> list[float]:
        return self._fn(images, prompts)


def _world(name: str) -> Callable[[Settings], Scorer | Unavailable]:
    """Configured by ``scorer_paths[name]`` = the world's weights folder (only worlds' own images make sense)."""

    def load(settings: Settings) -> Scorer | Unavailable:
        raw = settings.scorer_paths.get(name, "")
        if not raw:
            return Unavailable(name, f"not configured (set scorer_paths[{name!r}] to the world's weights folder)")
        from world import paths, scorers
        from world.integrity import WorldError, verified

        folder = Path(os.path.expanduser(raw)).resolve()
        if folder != paths.shipped_dir().resolve():
            return Unavailable(name, f"{folder} is not the active world ({paths.shipped_dir()}; set DIFFGRAPH_WORLD_DIR)")
        weights = paths.reader_path() if name == "world-adherence" else paths.clip_dir() / "model.safetensors"
        try:
            verified(weights)
        except WorldError as exc:
            return Unavailable(name, str(exc))
        return WorldScorer(name, scorers.adherence if name == "world-adherence" else scorers.clip_score, weights)

    return load


LOADERS: dict[str, Callable[[Settings], Scorer | Unavailable]] = {
    "world-adherence": _world("world-adherence"),
    "world-clip": _world("world-clip"),
    "clip": _load_clip,
    "aesthetic": _load_aesthetic,
    "imagereward": _load_imagereward,
    "hpsv2": _load_hpsv2,
    "pickscore": _load_pickscore,
}


def available_scorers(settings: Settings) -> dict[str, Scorer | Unavailable]:
    """Every registered scorer: a loaded ``Scorer`` or ``Unavailable`` with the reason (never dropped)."""
    out: dict[str, Scorer | Unavailable] = {}
    for name, loader in LOADERS.items():
        try:
            out[name] = loader(settings)
        except ScorerError as exc:
            out[name] = Unavailable(name, str(exc))
        except Exception as exc:  # a broken optional package (ImportError included) costs one scorer, not the run
            first = (str(exc).strip().splitlines() or [""])[0][:200]
            out[name] = Unavailable(name, f"failed to load: {type(exc).__name__}: {first}".rstrip(": "))
    return out
