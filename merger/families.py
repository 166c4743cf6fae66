"""The family registry: per model family, the pipeline class, the merged components and how a single-file
checkpoint spells them. SD1.5 is implemented end to end; SDXL and FLUX are described so detection and
error messages already know them (their layout conversion is the missing piece).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from merger.errors import MergeError


@dataclass(frozen=True)
class Family:
    """One model family.

    Attributes:
        name: the ``base_family`` string used across DiffGraph (``sd15``, ``sdxl``, ``flux``).
        pipeline_class: the diffusers pipeline class name (``model_index.json``'s ``_class_name``).
        components: merged components, as diffusers subfolders, in merge order.
        prefixes: component → key prefix in a single-file (original layout) checkpoint.
        sentinels: keys whose presence in a single file identifies the family (any one suffices).
        supported: whether layout conversion and merging are implemented.
    """

    name: str
    pipeline_class: str
    components: tuple[str, ...]
    prefixes: dict[str, str] = field(default_factory=dict)
    sentinels: tuple[str, ...] = ()
    supported: bool = False

    def component_of(self, single_file_key: str) -> str | None:
        """The component a single-file key belongs to, or None for keys outside the merged components."""
        for component, prefix in self.prefixes.items():
            if single_file_key.startswith(prefix):
                return component
        return None


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family(
            name="sd15",
            pipeline_class="StableDiffusionPipeline",
            components=("unet", "text_encoder", "vae"),
            prefixes={
                "unet": "model.diffusion_model.",
                "text_encoder": "cond_stage_model.transformer.",
                "vae": "first_stage_model.",
            },
            sentinels=("cond_stage_model.transformer.text_model.embeddings.position_embedding.weight",),
            supported=True,
        ),
        Family(
            name="sd2",
            pipeline_class="StableDiffusionPipeline",
            components=("unet", "text_encoder", "vae"),
            prefixes={
                "unet": "model.diffusion_model.",
                "text_encoder": "cond_stage_model.model.",
                "vae": "first_stage_model.",
            },
            sentinels=("cond_stage_model.model.token_embedding.weight",),
        ),
        Family(
            name="sdxl",
            pipeline_class="StableDiffusionXLPipeline",
            components=("unet", "text_encoder", "text_encoder_2", "vae"),
            prefixes={
                "unet": "model.diffusion_model.",
                "text_encoder": "conditioner.embedders.0.transformer.",
                "text_encoder_2": "conditioner.embedders.1.model.",
                "vae": "first_stage_model.",
            },
            sentinels=(
                "conditioner.embedders.1.model.positional_embedding",
                "conditioner.embedders.0.transformer.text_model.embeddings.position_embedding.weight",
            ),
        ),
        Family(
            name="flux",
            pipeline_class="FluxPipeline",
            components=("transformer", "vae"),
            prefixes={"transformer": "model.diffusion_model.", "vae": "vae."},
            sentinels=(
                "model.diffusion_model.double_blocks.0.img_attn.norm.key_norm.scale",
                "double_blocks.0.img_attn.norm.key_norm.scale",
            ),
        ),
    )
}

# Pipeline classes that share a family's weights (img2img/inpaint variants save the same components).
_PIPELINE_ALIASES = {
    "StableDiffusionImg2ImgPipeline": "sd15",
    "StableDiffusionXLImg2ImgPipeline": "sdxl",
}


def get_family(name: str) -> Family:
    """The registered family called ``name`` (raises MergeError naming the known ones)."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise MergeError(f"unknown model family {name!r} (known: {', '.join(FAMILIES)})") from None


def detect_single_file_family(keys: set[str] | list[str]) -> Family | None:
    """The family of a single-file checkpoint judged by its sentinel keys, or None when none matches.

    SDXL is tested before SD1.5 because an SDXL file also has a CLIP-L text encoder.
    """
    keyset = set(keys)
    for name in ("sdxl", "flux", "sd2", "sd15"):
        family = FAMILIES[name]
        if any(s in keyset for s in family.sentinels):
            return family
    return None


def family_for_pipeline_class(class_name: str, text_encoder_dims: int | None = None) -> Family | None:
    """The family of a diffusers directory from its ``model_index.json`` class name.

    SD1.5 and SD2 share ``StableDiffusionPipeline``; an OpenCLIP text encoder (``text_encoder_dims`` 1024)
    marks SD2.
    """
    name = _PIPELINE_ALIASES.get(class_name)
    if name is None:
        matches = [f.name for f in FAMILIES.values() if f.pipeline_class == class_name]
        if not matches:
            return None
        name = matches[0]
    if name in ("sd15", "sd2") and text_encoder_dims == 1024:
        name = "sd2"
    return FAMILIES[name]
