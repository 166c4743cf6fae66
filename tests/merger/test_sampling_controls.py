"""Sampling controls: scheduler by diffusers class or A1111 name, clip skip (A1111 convention), compel
prompt weighting and long prompts, trigger words, ``<lora:…>`` tags kept from the text encoder."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from core.families import family
from core.types import MergePlan, PlannedExpert, ValidationFailed
from merger.sampling import (
    a1111_to_compel,
    diffusers_clip_skip,
    prompt_arguments,
    scheduler_spec,
    strip_lora_tags,
    with_trigger_words,
)
from tests.fakes.zoo import TinyZoo, build_tiny_zoo

LONG = ", ".join(["a photo of a red fox in a snowy forest at golden hour"] * 8)


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> TinyZoo:
    return build_tiny_zoo(tmp_path_factory.getbasetemp() / "merger-tiny-zoo")


@pytest.fixture(scope="module")
def pipe(zoo: TinyZoo):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(str(zoo.base_dir), local_files_only=True, safety_checker=None)


def test_prompt_text_helpers() -> None:
    assert strip_lora_tags("a fox <lora:watercolor_v2:0.8> in snow <LORA:x:1>") == "a fox in snow"
    assert a1111_to_compel("a (red fox:1.2), (snow: 0.8) scene") == "a (red fox)1.2, (snow)0.8 scene"
    assert with_trigger_words("a Fox", ["fox", "wtrclr style", "wtrclr style"]) == "a Fox, wtrclr style"


@pytest.mark.parametrize("name,cls,overrides", [
    ("DPM++ 2M Karras", "DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    ("Euler a", "EulerAncestralDiscreteScheduler", {}),
    ("DDIM", "DDIMScheduler", {}),
    ("UniPC", "UniPCMultistepScheduler", {}),
    ("HeunDiscreteScheduler", "HeunDiscreteScheduler", {}),
])
def test_scheduler_names(name: str, cls: str, overrides: dict, pipe) -> None:
    import diffusers

    assert scheduler_spec(name, family("sd15")) == (cls, overrides)
    built = getattr(diffusers, cls).from_config(pipe.scheduler.config, **overrides)
    assert type(built).__name__ == cls and all(built.config[k] == v for k, v in overrides.items())


def test_scheduler_family_rules() -> None:
    assert scheduler_spec("Euler", family("flux"))[0] == "FlowMatchEulerDiscreteScheduler"
    with pytest.raises(ValidationFailed, match="unknown scheduler"):
        scheduler_spec("DDIM", family("flux-schnell"))
    with pytest.raises(ValidationFailed, match="does not fit"):
        scheduler_spec("FlowMatchEulerDiscreteScheduler", family("sdxl"))
    with pytest.raises(ValidationFailed, match="unknown scheduler"):
        scheduler_spec("os.system", family("sd15"))


def test_clip_skip_convention() -> None:
    assert diffusers_clip_skip(1, family("sd15")) is None and diffusers_clip_skip(2, family("sd15")) == 1
    assert diffusers_clip_skip(2, family("pony")) is None and diffusers_clip_skip(3, family("sdxl")) == 1
    with pytest.raises(ValidationFailed):
        diffusers_clip_skip(2, family("flux"))


def test_clip_skip_2_reads_the_penultimate_layer(pipe) -> None:
    args = prompt_arguments(pipe, family("sd15"), ["a red fox"], "", clip_skip=2)
    assert args["clip_skip"] == 1
    embeds, _ = pipe.encode_prompt("a red fox", "cpu", 1, False, clip_skip=args["clip_skip"])
    ids = pipe.tokenizer("a red fox", padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        hidden = pipe.text_encoder(ids, output_hidden_states=True).hidden_states[-2]
        want = pipe.text_encoder.final_layer_norm(hidden)
    assert torch.allclose(embeds, want, atol=1e-6)
    assert "text_model" not in dict(pipe.text_encoder.named_modules())  # the alias is not a submodule


def test_weighting_and_long_prompts_go_through_compel(pipe) -> None:
    plain = prompt_arguments(pipe, family("sd15"), ["a red fox"], "blurry", None)
    assert plain["prompt"] == ["a red fox"] and plain["negative_prompt"] == ["blurry"]
    weighted = prompt_arguments(pipe, family("sd15"), ["a (red fox:1.5) in snow"], "", None)
    neutral = prompt_arguments(pipe, family("sd15"), ["a (red fox:1.0) in snow"], "", None)
    assert weighted["prompt_embeds"].shape == neutral["prompt_embeds"].shape == (1, 77, 32)
    assert not torch.allclose(weighted["prompt_embeds"], neutral["prompt_embeds"])
    long = prompt_arguments(pipe, family("sd15"), [LONG], "blurry", None)
    assert long["prompt_embeds"].shape[1] > 77
    assert long["negative_prompt_embeds"].shape == long["prompt_embeds"].shape


def test_generate_with_controls(zoo: TinyZoo, settings) -> None:
    from merger.generate import Generator

    gen = Generator(settings)
    plan = MergePlan(base_family="sd15", base_model=str(zoo.base_dir), loras=[
        PlannedExpert(expert_id="l", kind="lora", coefficient=0.5, path=str(zoo.loras_kohya[0]),
                      trigger_words=["wtrclr"])])
    kwargs = dict(steps=2, width=64, height=64, seed=1)
    base = gen.generate(plan, "a fox <lora:x:1>", **kwargs).images[0]
    euler = gen.generate(plan, "a fox", scheduler="Euler a", **kwargs).images[0]
    weighted = gen.generate(plan, "a (fox:1.4), " + LONG, negative_prompt="(blurry:1.2)", clip_skip=2,
                            **kwargs).images[0]
    entry = next(iter(gen.pipelines._entries.values()))
    assert type(entry.pipe.scheduler).__name__ == "DDIMScheduler"  # restored after "Euler a"
    assert base.tobytes() != euler.tobytes() and weighted.size == (64, 64)
    with pytest.raises(ValidationFailed, match="unknown scheduler"):
        gen.generate(plan, "a fox", scheduler="Nope", **kwargs)


def test_sdxl_compel_long_prompt(tmp_path: Path) -> None:
    from tests.fakes.families import build_tiny_sdxl_pipeline

    sdxl = build_tiny_sdxl_pipeline(tmp_path / "tok")
    args = prompt_arguments(sdxl, family("illustrious"), ["(red fox:1.3), " + LONG], "blurry", 2)
    assert args["prompt_embeds"].shape[1] > 77 and args["pooled_prompt_embeds"].shape == (1, 32)
    out = sdxl(**args, num_inference_steps=1, width=32, height=32, output_type="np")
    assert out.images.shape == (1, 32, 32, 3)
