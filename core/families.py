"""Model families: the one definition every package uses (crawler normaliser, graph features, planner,
calibration, merger, sampling).

A *family* is what an expert is made for and what a plan is built on (``BaseModel`` node names). Several
families share an *architecture* (``arch``): Pony, Illustrious and NoobAI are SDXL-architecture
fine-tunes, FLUX.1 schnell shares FLUX.1 dev's transformer. Weights are converted and merged by
architecture; experts are matched by family, so a Pony LoRA is never merged into Illustrious by accident.

The compatibility rule, written once (:meth:`Family.accepts`): an expert fits a base of the same family.
A file read from disk only tells its architecture, so the merger checks architectures (a tensor-level
necessity) and the plan checks families (:func:`check_plan_family`).
"""

from __future__ import annotations

from dataclasses import dataclass, field


class FamilyError(ValueError):
    """An unknown family name or a mix of families (shown to users as one line)."""


@dataclass(frozen=True)
class Family:
    """One model family.

    Attributes:
        name: the ``base_family`` string used across DiffGraph (``sd15``, ``sdxl``, ``pony``, ``flux``…).
        arch: the weight architecture (``sd15``, ``sd2``, ``sdxl``, ``flux``); layouts are per architecture.
        label: how users and Civitai call it.
        pipeline_class: the diffusers pipeline class name (``model_index.json``'s ``_class_name``).
        components: merged components, as diffusers subfolders, in merge order.
        prefixes: component → key prefix in a single-file (original layout) checkpoint.
        sentinels: keys whose presence in a single file identifies the architecture (any one suffices).
        steps, guidance: sampling defaults for real models of this family.
        size: native resolution in pixels when the base model's own config cannot tell it.
        negative: whether the family's pipeline takes negative prompts (FLUX is guidance-distilled).
    """

    name: str
    arch: str
    label: str
    pipeline_class: str
    components: tuple[str, ...]
    prefixes: dict[str, str] = field(default_factory=dict)
    sentinels: tuple[str, ...] = ()
    steps: int = 20
    guidance: float = 7.0
    size: int = 512
    negative: bool = True

    def accepts(self, other: Family | str) -> bool:
        """Whether an expert of family ``other`` may be merged into a base of this family."""
        return (other if isinstance(other, str) else other.name) == self.name

    def component_of(self, single_file_key: str) -> str | None:
        """The component a single-file key belongs to, or None for keys outside the merged components."""
        for component, prefix in self.prefixes.items():
            if single_file_key.startswith(prefix):
                return component
        return None


_SD15_PREFIXES = {"unet": "model.diffusion_model.", "text_encoder": "cond_stage_model.transformer.",
                  "vae": "first_stage_model."}
_SDXL = dict(
    arch="sdxl", pipeline_class="StableDiffusionXLPipeline",
    components=("unet", "text_encoder", "text_encoder_2", "vae"),
    prefixes={"unet": "model.diffusion_model.", "text_encoder": "conditioner.embedders.0.transformer.",
              "text_encoder_2": "conditioner.embedders.1.model.", "vae": "first_stage_model."},
    sentinels=("conditioner.embedders.1.model.positional_embedding",
               "conditioner.embedders.0.transformer.text_model.embeddings.position_embedding.weight"),
    steps=25, guidance=7.0, size=1024,
)
_FLUX = dict(
    arch="flux", pipeline_class="FluxPipeline", components=("transformer",),
    prefixes={"transformer": "model.diffusion_model."},
    sentinels=("model.diffusion_model.double_blocks.0.img_attn.norm.key_norm.scale",
               "double_blocks.0.img_attn.norm.key_norm.scale"),
    size=1024, negative=False,
)

FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family("sd15", "sd15", "SD 1.5", "StableDiffusionPipeline", ("unet", "text_encoder", "vae"),
               _SD15_PREFIXES,
               ("cond_stage_model.transformer.text_model.embeddings.position_embedding.weight",),
               steps=20, guidance=7.0, size=512),
        Family("sd2", "sd2", "SD 2.x", "StableDiffusionPipeline", ("unet", "text_encoder", "vae"),
               {**_SD15_PREFIXES, "text_encoder": "cond_stage_model.model."},
               ("cond_stage_model.model.token_embedding.weight",), steps=20, guidance=7.0, size=768),
        Family("sdxl", label="SDXL 1.0", **_SDXL),
        Family("pony", label="Pony", **_SDXL),
        Family("illustrious", label="Illustrious", **_SDXL),
        Family("noobai", label="NoobAI", **_SDXL),
        Family("flux", label="FLUX.1 dev", steps=28, guidance=3.5, **_FLUX),
        Family("flux-schnell", label="FLUX.1 schnell", steps=4, guidance=0.0, **_FLUX),
    )
}
#: Architectures in feature order (the VGAE's family one-hot is by architecture; anything else → "other").
ARCHS = ("sd15", "sd2", "sdxl", "flux", "other")


def family(name: str) -> Family:
    """The family called ``name``.

    Raises:
        FamilyError: an unknown name (the message lists the known ones).
    """
    try:
        return FAMILIES[name]
    except KeyError:
        raise FamilyError(f"unknown model family {name!r} (known: {', '.join(FAMILIES)})") from None


def arch_of(name: str | None) -> str:
    """The architecture of a family name; ``"other"`` for unknown or empty names."""
    fam = FAMILIES.get(name or "")
    return fam.arch if fam is not None else "other"


def check_plan_family(base_family: str, experts: list[tuple[str, str]]) -> None:
    """Refuse a plan whose experts are not all of the base's family.

    Args:
        base_family: the plan's family.
        experts: ``(label, family)`` of each planned expert.

    Raises:
        FamilyError: naming the first expert of another family and both families.
    """
    base = family(base_family)
    for label, fam in experts:
        if fam not in FAMILIES or not base.accepts(fam):
            raise FamilyError(f"{label} is a {fam} expert but the plan's base family is {base.name}; "
                              "a plan never mixes families")
