"""Telling a weight file's architecture from its keys or its ``model_index.json``.

The families themselves are defined once in :mod:`core.families`; a file only tells its architecture, so
these functions return the architecture's root family (``sdxl`` for a Pony file, ``flux`` for schnell).
"""

from __future__ import annotations

from core.families import FAMILIES, Family, FamilyError, family
from merger.errors import MergeError

__all__ = ["FAMILIES", "Family", "detect_single_file_family", "family_for_pipeline_class", "get_family"]

# Pipeline classes that share a family's weights (img2img/inpaint variants save the same components).
_PIPELINE_ALIASES = {
    "StableDiffusionImg2ImgPipeline": "sd15",
    "StableDiffusionXLImg2ImgPipeline": "sdxl",
    "FluxImg2ImgPipeline": "flux",
}


def get_family(name: str) -> Family:
    """The registered family called ``name`` (raises MergeError naming the known ones)."""
    try:
        return family(name)
    except FamilyError as exc:
        raise MergeError(str(exc)) from None


def detect_single_file_family(keys: set[str] | list[str]) -> Family | None:
    """The architecture of a single-file checkpoint judged by its sentinel keys, or None when none matches.

    SDXL is tested before SD1.5 because an SDXL file also has a CLIP-L text encoder.
    """
    keyset = set(keys)
    for name in ("sdxl", "flux", "sd2", "sd15"):
        fam = FAMILIES[name]
        if any(s in keyset for s in fam.sentinels):
            return fam
    return None


def family_for_pipeline_class(class_name: str, text_encoder_dims: int | None = None) -> Family | None:
    """The architecture of a diffusers directory from its ``model_index.json`` class name.

    SD1.5 and SD2 share ``StableDiffusionPipeline``; an OpenCLIP text encoder (``text_encoder_dims`` 1024)
    marks SD2.
    """
    name = _PIPELINE_ALIASES.get(class_name)
    if name is None:
        matches = [f.name for f in FAMILIES.values() if f.pipeline_class == class_name and f.name == f.arch]
        if not matches:
            return None
        name = matches[0]
    if name in ("sd15", "sd2") and text_encoder_dims == 1024:
        name = "sd2"
    return FAMILIES[name]
