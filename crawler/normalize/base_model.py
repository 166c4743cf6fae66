"""Base-model strings (Civitai ``baseModel``, HF ``base_model``) → model family."""

from __future__ import annotations

import re

from core.families import FAMILIES

KNOWN_FAMILIES = tuple(FAMILIES)

# Civitai spellings. Pony, Illustrious and NoobAI are SDXL-architecture fine-tunes but families of their own
# (core.families): their LoRAs load into an SDXL UNet, yet a Pony LoRA on Illustrious is a mistake.
_CIVITAI = {
    "sd 1.4": "sd15",
    "sd 1.5": "sd15",
    "sd 1.5 lcm": "sd15",
    "sd 1.5 hyper": "sd15",
    "sd 2.0": "sd2",
    "sd 2.0 768": "sd2",
    "sd 2.1": "sd2",
    "sd 2.1 768": "sd2",
    "sd 2.1 unclip": "sd2",
    "sdxl 0.9": "sdxl",
    "sdxl 1.0": "sdxl",
    "sdxl 1.0 lcm": "sdxl",
    "sdxl turbo": "sdxl",
    "sdxl lightning": "sdxl",
    "sdxl hyper": "sdxl",
    "sdxl distilled": "sdxl",
    "pony": "pony",
    "illustrious": "illustrious",
    "noobai": "noobai",
    "flux.1 d": "flux",
    "flux.1 s": "flux-schnell",
    "flux.1 dev": "flux",
    "flux.1 schnell": "flux-schnell",
}

# Hugging Face base repositories (lower-cased repo ids).
_HF_PATTERNS = (
    (re.compile(r"(stable-diffusion-v1-[45]|sd-v1-[45]|stable-diffusion-v-?1)"), "sd15"),
    (re.compile(r"stable-diffusion-2(-1)?(-base)?$|stable-diffusion-2-1"), "sd2"),
    (re.compile(r"pony"), "pony"),
    (re.compile(r"illustrious"), "illustrious"),
    (re.compile(r"noobai"), "noobai"),
    (re.compile(r"stable-diffusion-xl|sdxl"), "sdxl"),
    (re.compile(r"flux\.?1-schnell"), "flux-schnell"),
    (re.compile(r"flux\.?1|black-forest-labs/flux"), "flux"),
)


def normalize_base_model(raw: str | None) -> tuple[str, bool]:
    """Map a raw base-model string to ``(family, family_known)``.

    Unknown strings are kept as-is (trimmed, at most 64 characters) with ``family_known=False``, so they are
    never silently merged with a known family.

    >>> normalize_base_model("SD 1.5")
    ('sd15', True)
    >>> normalize_base_model("Hunyuan 1")
    ('Hunyuan 1', False)
    """
    text = " ".join(str(raw or "").split())[:64]
    if not text:
        return "unknown", False
    key = text.lower()
    if key in _CIVITAI:
        return _CIVITAI[key], True
    if "/" in key:
        for pattern, family in _HF_PATTERNS:
            if pattern.search(key):
                return family, True
    return text, False
