"""Sampling images for a merge plan: resolve the base, merge checkpoints (cached), build or reuse the
pipeline, apply weighted LoRAs, sample, and report per-stage timings."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from core.types import MergePlan, PlannedExpert, ValidationFailed
from merger.errors import MergeError
from merger.pipeline import (
    PIPELINE_CACHE_SIZE,
    LoraCache,
    LoraMode,
    PipelineCache,
    applied_loras,
    file_identity,
    load_pipeline,
    resolve_base,
)

if TYPE_CHECKING:
    from PIL.Image import Image

    from core.settings import Settings

Progress = Callable[[str, int, int], None]
MAX_PROMPT_CHARS = 2000


@dataclass
class GenerationResult:
    """Images in prompt-major order (``len(prompts) * num_images``) and seconds per stage
    (``load``, ``merge``, ``lora``, ``sample``)."""

    images: list[Image]
    timings: dict[str, float] = field(default_factory=dict)
    lora_mode: str = "none"


def _local_path(expert: PlannedExpert) -> Path:
    label = expert.name or expert.expert_id
    if not expert.path:
        raise MergeError(f"expert {label} ({expert.expert_id}) has no local weight file; resolve it first")
    path = Path(expert.path).expanduser()
    if not path.is_file():
        raise MergeError(f"expert {label} ({expert.expert_id}): weight file not found: {path}")
    return path


class Generator:
    """Builds merged pipelines for plans and samples them; keeps an LRU of built pipelines.

    Args:
        settings: device/dtype (``resolved_device()``, ``resolved_dtype()``), base models, ``allow_pickle``.
        cache_size (`int`, *optional*): how many built pipelines stay in memory.
        lora_mode (`str`, *optional*, defaults to ``"fuse"``): LoRA policy ``fuse``, ``adapters`` or ``auto``
            (see :mod:`merger.pipeline`; LoHa/LoKr are always fused).

    Example:
        >>> result = Generator(settings).generate(plan, "a red fox", seed=1, steps=20)
        >>> result.images[0].save("fox.png"); result.timings["sample"]
    """

    def __init__(self, settings: Settings, cache_size: int = PIPELINE_CACHE_SIZE, lora_mode: LoraMode = "fuse"):
        self.settings = settings
        self.device = settings.resolved_device()
        self.dtype = settings.resolved_dtype()
        self.pipelines = PipelineCache(cache_size)
        self.loras = LoraCache()
        self.lora_mode: LoraMode = lora_mode

    def generate(self, plan: MergePlan, prompt: str | list[str], negative_prompt: str = "", seed: int = 0,
                 steps: int = 20, guidance: float = 7.0, width: int | None = None, height: int | None = None,
                 num_images: int = 1, progress: Progress | None = None) -> GenerationResult:
        """Sample ``num_images`` per prompt from the plan's merged model (``width``/``height`` None: the base's
        native resolution, UNet ``sample_size`` × VAE scale factor, as diffusers pipelines default to).

        Raises:
            ValidationFailed: empty prompt or bad sampling arguments.
            MergeError: missing base/expert files (naming the expert), incompatible experts, bad weights.
        """
        import torch

        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts or any(not p or not p.strip() for p in prompts):
            raise ValidationFailed("prompt must not be empty")
        if any(len(p) > MAX_PROMPT_CHARS for p in prompts):
            raise ValidationFailed(f"prompt longer than {MAX_PROMPT_CHARS} characters")
        if steps < 1 or num_images < 1 or any(v is not None and (v % 8 or v < 8) for v in (width, height)):
            raise ValidationFailed("steps and num_images must be ≥ 1; width and height positive multiples of 8")
        report = progress or (lambda stage, step, total: None)
        timings = {"load": 0.0, "merge": 0.0, "lora": 0.0, "sample": 0.0}

        base = resolve_base(self.settings, plan.base_model, plan.base_family)
        checkpoints = [(_local_path(e), e.coefficient) for e in plan.checkpoints]
        lora_paths = [(_local_path(e), e) for e in plan.loras]

        start = time.perf_counter()
        report("merge", 0, 1)
        if checkpoints:
            from merger.merge import merged_checkpoint

            weights = merged_checkpoint(self.settings, base.path, checkpoints, plan.merge_method, self.dtype,
                                        plan.density, plan.seed)
            identity = f"merge:{file_identity(weights)}"
        else:
            weights, identity = base.path, f"base:{file_identity(base.path)}"
        report("merge", 1, 1)
        timings["merge"] = time.perf_counter() - start

        start = time.perf_counter()
        report("load", 0, 1)
        key = (identity, str(base.config_dir), self.device, self.dtype)
        entry, _ = self.pipelines.get(
            key, lambda: load_pipeline(weights, base.config_dir, base.family, self.device, self.dtype))
        report("load", 1, 1)
        timings["load"] = time.perf_counter() - start
        native = int(entry.pipe.unet.config.sample_size) * int(entry.pipe.vae_scale_factor)
        width, height = width or native, height or native

        start = time.perf_counter()
        report("lora", 0, len(lora_paths))
        loras = []
        for i, (path, expert) in enumerate(lora_paths):
            ident, deltas = self.loras.load(path, expert.name or expert.expert_id, self.settings.allow_pickle)
            loras.append((ident, deltas, float(expert.coefficient)))
            report("lora", i + 1, len(lora_paths))
        with applied_loras(entry, loras, self.lora_mode) as mode:
            timings["lora"] = time.perf_counter() - start
            start = time.perf_counter()
            report("sample", 0, steps)

            def on_step(pipe, step, timestep, kwargs):  # diffusers' callback_on_step_end signature
                report("sample", step + 1, steps)
                return kwargs

            # A CPU generator gives the same noise on every device, so a seed means the same image.
            gen = torch.Generator(device="cpu").manual_seed(int(seed))
            with torch.inference_mode():
                out = entry.pipe(
                    prompt=prompts, negative_prompt=[negative_prompt] * len(prompts) if negative_prompt else None,
                    num_inference_steps=steps, guidance_scale=guidance, width=width, height=height,
                    num_images_per_prompt=num_images, generator=gen, output_type="pil",
                    callback_on_step_end=on_step,
                )
            timings["sample"] = time.perf_counter() - start
            restore_start = time.perf_counter()
        timings["lora"] += time.perf_counter() - restore_start
        return GenerationResult(images=list(out.images), timings=timings, lora_mode=mode)
