"""Sampling images for a merge plan: resolve the base, merge checkpoints (cached), build or reuse the
pipeline, apply weighted LoRAs, sample, and report per-stage timings."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from core.types import MergePlan, PlannedExpert, ValidationFailed
from merger.diffusers_pipeline import (
    PIPELINE_CACHE_SIZE,
    LoraCache,
    LoraMode,
    PipelineCache,
    applied_loras,
    file_identity,
    load_pipeline,
    resolve_base,
)
from merger.errors import MergeError
from merger.families import get_family
from merger.sampling import (
    MAX_TRIGGER_WORDS,
    diffusers_clip_skip,
    embedding_token,
    prompt_arguments,
    scheduler_applied,
    scheduler_spec,
    strip_lora_tags,
    textual_inversions,
    with_trigger_words,
)

if TYPE_CHECKING:
    from PIL.Image import Image

    from core.settings import Settings

Progress = Callable[[str, int, int], None]
MAX_SAMPLER_PROMPT_CHARS = 2000  # the text encoder reads 77 tokens; a request may carry core.types.MAX_PROMPT_CHARS


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
            (see :mod:`merger.diffusers_pipeline`; LoHa/LoKr are always fused).

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
                 steps: int | None = None, guidance: float | None = None, width: int | None = None,
                 height: int | None = None, num_images: int = 1, progress: Progress | None = None,
                 scheduler: str | None = None, clip_skip: int | None = None,
                 seeds: list[int] | None = None) -> GenerationResult:
        """Sample ``num_images`` per prompt from the plan's merged model.

        ``steps`` and ``guidance`` default to the plan family's (:mod:`core.families`); ``width``/``height``
        to the base model's native resolution (UNet/transformer sample size × VAE scale, as diffusers does).
        ``scheduler`` (a diffusers class or an A1111 name such as ``"DPM++ 2M Karras"``) and ``clip_skip``
        (A1111 convention) default to the plan's; the chosen LoRAs' trigger words are appended to the
        prompt, ``<lora:…>`` tags removed from it, and weights ``(word:1.2)`` or prompts over 77 tokens
        are encoded with compel (:mod:`merger.sampling`).

        ``seeds`` (one per image, prompt-major) gives every image its own noise, so an image does not depend
        on the batch it was sampled in; otherwise ``seed`` seeds the whole batch.

        Raises:
            ValidationFailed: empty prompt or bad sampling arguments.
            MergeError: missing base/expert files (naming the expert), incompatible experts, bad weights.
        """
        import torch

        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts or any(not p or not p.strip() for p in prompts):
            raise ValidationFailed("prompt must not be empty")
        if any(len(p) > MAX_SAMPLER_PROMPT_CHARS for p in prompts):
            raise ValidationFailed(f"prompt longer than {MAX_SAMPLER_PROMPT_CHARS} characters")
        fam = get_family(plan.base_family)
        steps = fam.steps if steps is None else steps
        guidance = fam.guidance if guidance is None else guidance
        if steps < 1 or num_images < 1 or any(v is not None and (v % 8 or v < 8) for v in (width, height)):
            raise ValidationFailed("steps and num_images must be ≥ 1; width and height positive multiples of 8")
        scheduler = scheduler or plan.scheduler or None
        clip_skip = clip_skip if clip_skip is not None else plan.clip_skip
        diffusers_clip_skip(clip_skip, fam)  # bad values fail before any work
        if scheduler:
            scheduler_spec(scheduler, fam)
        tokens = [(_local_path(e), embedding_token(e.trigger_words, e.name or e.expert_id)) for e in plan.embeddings]
        words = [w for e in plan.loras for w in e.trigger_words[:MAX_TRIGGER_WORDS]] + [t for _, t in tokens]
        prompts = [with_trigger_words(strip_lora_tags(p), words) for p in prompts]
        report = progress or (lambda stage, step, total: None)
        timings = {"load": 0.0, "merge": 0.0, "lora": 0.0, "sample": 0.0}

        base = resolve_base(self.settings, plan.base_model, plan.base_family)
        checkpoints = [(_local_path(e), e.coefficient) for e in plan.checkpoints]
        lora_paths = [(_local_path(e), e) for e in plan.loras]

        start = time.perf_counter()
        report("merge", 0, 1)
        if checkpoints:
            from merger.merge import cached_merge
            from merger.recipe import MergeRecipe

            weights = cached_merge(self.settings, MergeRecipe.from_plan(plan, str(base.path), self.dtype))
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
        if width is None or height is None:  # diffusers drops a lone width/height: fill the other in natively
            native_h, native_w = native_size(entry.pipe)
            width, height = width or native_w, height or native_h

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
            if seeds is not None:
                if len(seeds) != len(prompts) * num_images:
                    raise ValidationFailed(f"{len(seeds)} seeds for {len(prompts) * num_images} images")
                gen = [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds]
            else:
                gen = torch.Generator(device="cpu").manual_seed(int(seed))
            with torch.inference_mode(), scheduler_applied(entry.pipe, scheduler, fam), \
                    textual_inversions(entry.pipe, fam, tokens, self.settings.allow_pickle):
                text = prompt_arguments(entry.pipe, fam, prompts, negative_prompt, clip_skip)
                out = entry.pipe(
                    **text, num_inference_steps=steps, guidance_scale=guidance, width=width, height=height,
                    num_images_per_prompt=num_images, generator=gen, output_type="pil",
                    callback_on_step_end=on_step,
                )
            timings["sample"] = time.perf_counter() - start
            restore_start = time.perf_counter()
        timings["lora"] += time.perf_counter() - restore_start
        return GenerationResult(images=list(out.images), timings=timings, lora_mode=mode)


def native_size(pipe: Any) -> tuple[int, int]:
    """(height, width) a diffusers pipeline samples when given no size: the UNet's ``sample_size`` (or the
    transformer pipeline's ``default_sample_size``) × the VAE scale factor."""
    unet = getattr(pipe, "unet", None)
    if unet is not None:
        size = unet.config.sample_size
        h, w = (size, size) if isinstance(size, int) else (size[0], size[1])
    else:
        h = w = int(pipe.default_sample_size)
    return int(h) * int(pipe.vae_scale_factor), int(w) * int(pipe.vae_scale_factor)


_shared: dict[tuple[object, ...], Generator] = {}


def shared_generator(settings: Settings) -> Generator:
    """The process's one ``Generator`` for the settings it reads (device, dtype, data dir, pickle policy,
    base models), so a worker keeps its built pipelines between tasks; another configuration replaces it
    (its pipelines are let go). Calibration and generation workers both take theirs from here."""
    key = (settings.resolved_device(), settings.resolved_dtype(), str(Path(settings.data_dir).resolve()),
           settings.allow_pickle, tuple(sorted(settings.base_models.items())))  # fmt: skip
    if key not in _shared:
        _shared.clear()
        _shared[key] = Generator(settings)
    return _shared[key]
