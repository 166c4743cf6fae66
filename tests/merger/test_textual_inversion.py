"""Textual-inversion embeddings (Civitai type TextualInversion) from a plan: SD1.5 ``emb_params`` and SDXL
``clip_l``/``clip_g`` files are loaded for one generation and unloaded afterwards."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from core.families import family
from core.types import ExpertKind, MergePlan, PlannedExpert
from crawler.normalize.kind import normalize_kind
from merger.merge_writer import write_safetensors
from merger.sampling import prompt_arguments, textual_inversions
from tests.fakes.zoo import TinyZoo, build_tiny_zoo


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> TinyZoo:
    return build_tiny_zoo(tmp_path_factory.getbasetemp() / "merger-tiny-zoo")


def test_civitai_type_is_an_expert_kind() -> None:
    assert normalize_kind("TextualInversion") is ExpertKind.embedding
    assert ExpertKind.embedding.label == "Embedding" and not ExpertKind.embedding.is_adapter


def test_sd15_emb_params_loaded_for_one_generation(zoo: TinyZoo, settings, tmp_path: Path) -> None:
    from diffusers import StableDiffusionPipeline

    from merger.generate import Generator

    emb = write_safetensors(tmp_path / "fox-style.safetensors", {"emb_params": torch.randn(2, 32)})
    pipe = StableDiffusionPipeline.from_pretrained(str(zoo.base_dir), local_files_only=True, safety_checker=None)
    n_tokens = len(pipe.tokenizer)
    with textual_inversions(pipe, family("sd15"), [(emb, "fxstyle")]) as tokens:
        assert tokens == ["fxstyle"] and len(pipe.tokenizer) == n_tokens + 2  # two vectors
        with_tok = pipe.encode_prompt("a fox, fxstyle", "cpu", 1, False)[0]
        weighted = prompt_arguments(pipe, family("sd15"), ["a (fox:1.2), fxstyle"], "", None)
        assert weighted["prompt_embeds"].shape == (1, 77, 32)
    assert len(pipe.tokenizer) == n_tokens
    assert pipe.text_encoder.get_input_embeddings().weight.shape[0] == n_tokens
    without = pipe.encode_prompt("a fox, fxstyle", "cpu", 1, False)[0]
    assert not torch.allclose(with_tok, without)

    plan = MergePlan(base_family="sd15", base_model=str(zoo.base_dir), embeddings=[
        PlannedExpert(expert_id="civitai:1", name="Fox Style", kind="embedding", coefficient=1.0, path=str(emb),
                      trigger_words=["fxstyle"])])
    gen = Generator(settings)
    image = gen.generate(plan, "a fox", steps=1, width=64, height=64).images[0]
    assert image.size == (64, 64)
    entry = next(iter(gen.pipelines._entries.values()))
    assert len(entry.pipe.tokenizer) == n_tokens  # the cached pipeline is clean again


def test_sdxl_clip_l_clip_g_embedding(tmp_path: Path) -> None:
    from merger.errors import MergeError
    from tests.fakes.families import build_tiny_sdxl_pipeline

    pipe = build_tiny_sdxl_pipeline(tmp_path / "tok")
    emb = write_safetensors(tmp_path / "e.safetensors", {"clip_l": torch.randn(1, 32), "clip_g": torch.randn(1, 40)})
    n = len(pipe.tokenizer_2)
    with textual_inversions(pipe, family("pony"), [(emb, "<pnystyle>")]):
        assert len(pipe.tokenizer) == len(pipe.tokenizer_2) == n + 1
        assert pipe.text_encoder_2.get_input_embeddings().weight.shape[0] == n + 1
    assert len(pipe.tokenizer_2) == n
    bad = write_safetensors(tmp_path / "b.safetensors", {"emb_params": torch.randn(1, 32)})
    with pytest.raises(MergeError, match="clip_l and clip_g"), textual_inversions(pipe, family("sdxl"), [(bad, "x")]):
        pass
