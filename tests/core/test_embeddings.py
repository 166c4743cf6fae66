"""The offline MiniLM embedder: bf16 autocast is a speed choice that must not change what retrieval sees."""

from __future__ import annotations

import numpy as np
import pytest

from core import embeddings
from core.embeddings import SentenceTransformerEmbedder, default_model_path

TEXTS = [
    "Ink wash landscapes: a LoRA for SD 1.5. Trigger words: inkwash. Mountains and rivers in sumi-e style.",
    "Photorealistic portraits, soft window light, film grain",
    "anime girl, cel shading, vibrant colours",
    "a red vintage car parked on a rainy street at night, neon reflections",
    "pixel art",
    "",
]


@pytest.fixture(scope="module")
def both() -> tuple[SentenceTransformerEmbedder, SentenceTransformerEmbedder]:
    path = default_model_path()
    return SentenceTransformerEmbedder(path, precision="fp32"), SentenceTransformerEmbedder(path, precision="bf16")


def test_bf16_vectors_match_fp32(both) -> None:
    fp32, bf16 = both
    a, b = fp32.encode(TEXTS), bf16.encode(TEXTS)
    assert a.dtype == b.dtype == np.float32 and a.shape == b.shape == (len(TEXTS), 384)
    np.testing.assert_allclose(np.linalg.norm(b, axis=1), 1.0, atol=1e-5)
    assert (a * b).sum(axis=1).min() >= 0.999
    # the neighbour order between different texts is the same in both precisions
    assert (np.argsort(-(a @ a.T), axis=1)[:, :3] == np.argsort(-(b @ b.T), axis=1)[:, :3]).all()


def test_auto_precision_follows_the_hardware(monkeypatch) -> None:
    path = default_model_path()
    monkeypatch.setattr(embeddings, "native_bf16", lambda device: False)
    assert SentenceTransformerEmbedder(path).precision == "fp32"
    monkeypatch.setattr(embeddings, "native_bf16", lambda device: True)
    assert SentenceTransformerEmbedder(path).precision == "bf16"
    assert SentenceTransformerEmbedder(path, precision="fp32").precision == "fp32"


def test_precision_comes_from_settings(settings) -> None:
    from core.embeddings import get_embedder

    embedder = get_embedder(settings.model_copy(update={"embedding_precision": "fp32"}))
    assert embedder.precision == "fp32"
    assert np.isclose(np.linalg.norm(embedder.encode(["pixel art"])[0]), 1.0)
