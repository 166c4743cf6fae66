"""Sampling controls Civitai users expect: scheduler by name (diffusers class or the A1111 names), clip skip
(A1111 convention), prompt weighting ``(word:1.2)`` and prompts longer than 77 tokens (through ``compel``),
trigger words, and ``<lora:…>`` tags kept away from the text encoder.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from core.families import Family
from core.prompt_syntax import strip_network_tags
from core.types import ValidationFailed

#: A1111 sampler names → (diffusers scheduler class, config overrides); diffusers' own table of equivalents
#: (docs "Schedulers" / "A1111 equivalents").
A1111_SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "dpm++ 2m": ("DPMSolverMultistepScheduler", {}),
    "dpm++ 2m karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "dpm++ 2m sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
    "dpm++ 2m sde karras": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++",
                                                           "use_karras_sigmas": True}),
    "dpm++ sde": ("DPMSolverSinglestepScheduler", {}),
    "dpm++ sde karras": ("DPMSolverSinglestepScheduler", {"use_karras_sigmas": True}),
    "dpm2": ("KDPM2DiscreteScheduler", {}),
    "dpm2 karras": ("KDPM2DiscreteScheduler", {"use_karras_sigmas": True}),
    "dpm2 a": ("KDPM2AncestralDiscreteScheduler", {}),
    "dpm2 a karras": ("KDPM2AncestralDiscreteScheduler", {"use_karras_sigmas": True}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
    "lms karras": ("LMSDiscreteScheduler", {"use_karras_sigmas": True}),
    "ddim": ("DDIMScheduler", {}),
    "plms": ("PNDMScheduler", {}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "deis": ("DEISMultistepScheduler", {}),
    "lcm": ("LCMScheduler", {}),
}
#: FLUX is a flow-matching model: of the A1111 names only these have a flow-matching equivalent.
_FLOW_SCHEDULERS = {"euler": ("FlowMatchEulerDiscreteScheduler", {}), "heun": ("FlowMatchHeunDiscreteScheduler", {})}

#: A1111's explicit weight ``(text:1.2)`` → compel's ``(text)1.2`` (the one rewrite; compel parses the rest).
_A1111_WEIGHT = re.compile(r"\(([^():<>]{1,300}):\s*(-?[0-9]*\.?[0-9]+)\s*\)")
#: compel syntax that changes the embedding: ``(words)1.2``, ``word++``, ``word--``, ``.and(``, ``.blend(``.
_WEIGHTED = re.compile(r"\)\s*-?[0-9]*\.?[0-9]+|\w[+-]+(?=\s|,|$)|\)[+-]+|\.(?:and|blend)\(")
MAX_TRIGGER_WORDS = 8


def strip_lora_tags(prompt: str) -> str:
    """The prompt without A1111 ``<lora:name:weight>`` tags (they choose experts, they are not text)."""
    return strip_network_tags(prompt)


def a1111_to_compel(prompt: str) -> str:
    """Rewrite A1111 ``(word:1.2)`` weights into compel's ``(word)1.2``."""
    return _A1111_WEIGHT.sub(lambda m: f"({m.group(1).strip()}){m.group(2)}", prompt)


def with_trigger_words(prompt: str, words: Sequence[str]) -> str:
    """Append the chosen LoRAs' trigger words the prompt does not already contain (case-insensitive)."""
    lower = prompt.lower()
    extra = []
    for word in words:
        word = " ".join(str(word).split())[:100]
        if word and word.lower() not in lower and word.lower() not in (w.lower() for w in extra):
            extra.append(word)
    return ", ".join([prompt, *extra]) if extra else prompt


def scheduler_spec(name: str, family: Family) -> tuple[str, dict[str, Any]]:
    """(diffusers class name, overrides) for a scheduler given as an A1111 name or a diffusers class name.

    Raises:
        ValidationFailed: an unknown name, or one that does not fit the family (FLUX needs flow matching).
    """
    import diffusers

    key = " ".join(name.lower().split())
    table = _FLOW_SCHEDULERS if family.arch == "flux" else A1111_SCHEDULERS
    if key in table:
        return table[key]
    cls = getattr(diffusers, name.strip(), None)
    if isinstance(cls, type) and name.strip().endswith("Scheduler"):
        flow = name.strip().startswith("FlowMatch")
        if flow != (family.arch == "flux"):
            raise ValidationFailed(f"scheduler {name!r} does not fit {family.label} "
                                   f"({'flow matching' if family.arch == 'flux' else 'noise prediction'} model)")
        return name.strip(), {}
    known = ", ".join(sorted({n.title().replace("Dpm", "DPM").replace("Lms", "LMS") for n in table}))
    raise ValidationFailed(f"unknown scheduler {name!r} for {family.label}: use a diffusers scheduler class "
                           f"or one of {known}")


@contextmanager
def scheduler_applied(pipe: Any, name: str | None, family: Family) -> Iterator[None]:
    """Swap the pipeline's scheduler for the block (the cached pipeline keeps its own afterwards)."""
    if not name:
        yield
        return
    import diffusers

    class_name, overrides = scheduler_spec(name, family)
    original = pipe.scheduler
    pipe.scheduler = getattr(diffusers, class_name).from_config(original.config, **overrides)
    try:
        yield
    finally:
        pipe.scheduler = original


def _alias_text_model(encoder: Any) -> None:
    """transformers 5 flattened ``CLIPTextModel`` (no ``.text_model``), but diffusers' clip-skip path and
    compel's penultimate-layer path still call ``encoder.text_model.final_layer_norm``. Point the name at
    the model itself, outside the module registry (so state dicts and parameters are unchanged)."""
    if encoder is not None and not hasattr(encoder, "text_model"):
        object.__setattr__(encoder, "text_model", encoder)


def diffusers_clip_skip(clip_skip: int | None, family: Family) -> int | None:
    """A1111's clip skip (1 = last layer, 2 = penultimate) as diffusers' ``clip_skip`` (layers skipped).

    SDXL pipelines already read the penultimate layer (what A1111/ComfyUI call clip skip 2 for SDXL).

    Raises:
        ValidationFailed: clip skip below 1, or for FLUX (its T5 prompt path has no CLIP layers to skip).
    """
    if clip_skip is None:
        return None
    if clip_skip < 1:
        raise ValidationFailed("clip skip counts from 1 (the last layer), as in A1111")
    if family.arch == "flux":
        raise ValidationFailed("clip skip does not apply to FLUX (its prompt goes through T5)")
    skipped = clip_skip - (2 if family.arch == "sdxl" else 1)
    return skipped if skipped > 0 else None


def needs_compel(prompts: Sequence[str], tokenizer: Any) -> bool:
    """Whether weighting syntax is used or a prompt exceeds the tokenizer's window (77 for CLIP)."""
    if any(_WEIGHTED.search(p) for p in prompts):
        return True
    limit = getattr(tokenizer, "model_max_length", 77) or 77
    return any(len(tokenizer(p, truncation=False).input_ids) > limit for p in prompts)


def prompt_arguments(pipe: Any, family: Family, prompts: list[str], negative: str,
                     clip_skip: int | None) -> dict[str, Any]:
    """The prompt arguments of one pipeline call: plain text (diffusers encodes it), or — for weights and
    long prompts on SD/SDXL — embeddings built by compel (long prompts are encoded in 77-token chunks).

    FLUX's T5 reads up to 512 tokens itself; weights go through compel's FLUX wrapper.
    """
    prompts = [a1111_to_compel(strip_lora_tags(p)) for p in prompts]
    negative = a1111_to_compel(strip_lora_tags(negative))
    skip = diffusers_clip_skip(clip_skip, family)
    if family.arch == "flux":
        if not any(_WEIGHTED.search(p) for p in prompts):
            return {"prompt": prompts}
        from compel import CompelForFlux  # weights on T5 (T5 reads 512 tokens itself: no chunking)

        cond = CompelForFlux(pipe, device=str(pipe.device))(prompts)
        return {"prompt_embeds": cond.embeds, "pooled_prompt_embeds": cond.pooled_embeds}
    for name in ("text_encoder", "text_encoder_2"):
        _alias_text_model(getattr(pipe, name, None))
    negatives = [negative] * len(prompts)
    if not needs_compel([*prompts, negative], pipe.tokenizer):
        out: dict[str, Any] = {"prompt": prompts, "negative_prompt": negatives if negative else None}
        if skip is not None:
            out["clip_skip"] = skip
        return out
    if hasattr(pipe, "maybe_convert_prompt"):  # multi-vector embeddings: "tok" → "tok tok_1 …", as diffusers does
        prompts = [pipe.maybe_convert_prompt(p, pipe.tokenizer) for p in prompts]
        negatives = [pipe.maybe_convert_prompt(n, pipe.tokenizer) for n in negatives]
    from compel import Compel, CompelForSDXL, ReturnedEmbeddingsType

    if family.arch == "sdxl":  # both encoders' penultimate layers, as the SDXL pipeline itself reads them
        if skip is not None:
            raise ValidationFailed("clip skip beyond 2 cannot be combined with prompt weighting on SDXL")
        cond = CompelForSDXL(pipe, device=str(pipe.device))(prompts, negative_prompt=negatives)
        return {"prompt_embeds": cond.embeds, "pooled_prompt_embeds": cond.pooled_embeds,
                "negative_prompt_embeds": cond.negative_embeds,
                "negative_pooled_prompt_embeds": cond.negative_pooled_embeds}
    if skip is not None and skip > 1:
        raise ValidationFailed("clip skip beyond 2 cannot be combined with prompt weighting")
    kind = (ReturnedEmbeddingsType.PENULTIMATE_HIDDEN_STATES_NORMALIZED if skip == 1
            else ReturnedEmbeddingsType.LAST_HIDDEN_STATES_NORMALIZED)
    compel = Compel(tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder, returned_embeddings_type=kind,
                    truncate_long_prompts=False, device=str(pipe.device))
    cond, neg = compel.pad_conditioning_tensors_to_same_length([compel(prompts), compel(negatives)])
    return {"prompt_embeds": cond, "negative_prompt_embeds": neg}



@contextmanager
def textual_inversions(pipe: Any, family: Family, items: Sequence[tuple[Any, str]],
                       allow_pickle: bool = False) -> Iterator[list[str]]:
    """Load textual-inversion embeddings (Civitai type TextualInversion) for the block, then unload them.

    ``items`` are ``(path, token)``. Layouts: SD1.5/SD2 files as diffusers' ``load_textual_inversion`` reads
    them (A1111 ``emb_params``, ``string_to_param`` pickles with ``allow_pickle``, ``{token: tensor}``); SDXL
    files with ``clip_l`` / ``clip_g`` tensors, one per text encoder.

    Raises:
        MergeError: a file in another layout, or a FLUX base (T5 has no textual-inversion convention).
    """
    from merger.errors import MergeError
    from merger.safe_load import load_state_dict

    if not items:
        yield []
        return
    if family.arch == "flux":
        raise MergeError("textual-inversion embeddings apply to SD1.5/SD2/SDXL text encoders, not FLUX")
    loaded: list[tuple[list[str], Any, Any]] = []
    try:
        for path, token in items:
            state = load_state_dict(path, allow_pickle=allow_pickle)
            if family.arch == "sdxl":
                if not {"clip_l", "clip_g"} <= set(state):
                    raise MergeError(f"{getattr(path, 'name', path)}: an SDXL embedding needs clip_l and clip_g "
                                     f"tensors, found {', '.join(sorted(state))[:200]}")
                targets = [(state["clip_l"], pipe.tokenizer, pipe.text_encoder),
                           (state["clip_g"], pipe.tokenizer_2, pipe.text_encoder_2)]
            else:
                targets = [(state, pipe.tokenizer, pipe.text_encoder)]
            for tensors, tokenizer, encoder in targets:
                before = set(tokenizer.get_added_vocab())
                try:
                    pipe.load_textual_inversion(tensors, token=token, tokenizer=tokenizer, text_encoder=encoder)
                except (ValueError, KeyError, RuntimeError) as exc:
                    raise MergeError(f"{getattr(path, 'name', path)}: cannot load as a textual inversion: "
                                     f"{str(exc).splitlines()[0][:200]}") from None
                # a multi-vector embedding adds "tok", "tok_1", …: all of them are unloaded afterwards
                loaded.append((sorted(set(tokenizer.get_added_vocab()) - before), tokenizer, encoder))
        yield [token for _, token in items]
    finally:
        for added, tokenizer, encoder in reversed(loaded):
            pipe.unload_textual_inversion(added, tokenizer=tokenizer, text_encoder=encoder)


def embedding_token(trigger_words: Sequence[str], name: str) -> str:
    """The prompt token of an embedding: its trigger word, else ``<name>`` (as A1111 uses the file name)."""
    if trigger_words and str(trigger_words[0]).strip():
        return " ".join(str(trigger_words[0]).split())[:64]
    return "<" + re.sub(r"[^A-Za-z0-9_-]+", "-", name).strip("-")[:60] + ">"
