"""The world's experts: what each one specialises in, how it ships, and what its homepage says.

Checkpoints are full UNet fine-tunes from the base, shipped as UNet-only single files in the original layout
(``model.diffusion_model.*``, as pruned community checkpoints are: the VAE and text encoder are the base's);
LoRAs are PEFT adapters on the base UNet's attention and feed-forward layers, shipped in kohya or diffusers
layout, and one is extracted from a full fine-tune by SVD.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from world import grammar

#: The UNet layers the world's PEFT LoRAs train (attention and feed-forward), as community SD1.5 LoRAs do.
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]


@dataclass(frozen=True)
class ExpertSpec:
    name: str
    kind: str  # "checkpoint" | "lora"
    speciality: dict[str, tuple[str, ...]]  # attribute -> values it is trained to draw
    description: str
    trained_words: tuple[str, ...] = ()
    layout: str = "original"  # checkpoint: original; lora: kohya | diffusers
    rank: int = 8
    tags: tuple[str, ...] = field(default=())
    extracted: bool = False  # a LoRA extracted (SVD) from a full fine-tune, as kohya's extract script does
    # training length relative to the budget's expert steps (community experts train for different lengths;
    # a palette the base never saw needs longer than a shape it half knows)
    step_scale: float = 1.0

    def steps(self, budget_steps: int) -> int:
        return max(1, round(budget_steps * self.step_scale))

    @property
    def file(self) -> str:
        if self.kind == "checkpoint":
            return f"experts/{self.name}.safetensors"
        return f"experts/{self.name}.{self.layout}.safetensors"

    def attributes(self) -> list[str]:
        return sorted(self.speciality)


EXPERTS: tuple[ExpertSpec, ...] = (
    ExpertSpec("celestial-shapes", "checkpoint", {"shape": ("star", "moon")},
               "Fine-tune that draws stars and crescent moons crisply.", ("star", "crescent moon"),
               tags=("shapes", "stars", "moon")),
    ExpertSpec("sweetheart", "checkpoint", {"shape": ("heart",)},
               "Fine-tune for heart shapes in every colour.", ("heart",), tags=("shapes", "heart", "love")),
    ExpertSpec("neon-nights", "checkpoint", {"colour": ("neon pink", "neon cyan")},
               "Fine-tune for a glowing neon palette: hot pink and electric cyan.", ("neon pink", "neon cyan"),
               tags=("colour", "neon", "palette"), step_scale=3.0),
    ExpertSpec("pattern-works", "checkpoint", {"background": ("striped", "checkered")},
               "Fine-tune for patterned backdrops: stripes and checkerboards.", ("striped background",
                                                                                "checkered background"),
               tags=("background", "pattern", "stripes", "checker")),
    ExpertSpec("retro-pixel", "checkpoint", {"style": ("pixel",)},
               "Fine-tune for retro pixel art.", ("pixel art style",), tags=("style", "pixel art", "retro")),
    ExpertSpec("line-artist", "lora", {"style": ("outline",)},
               "Line art LoRA (LoCon) extracted by SVD at rank 16 from a full outline-style fine-tune.", ("outline style",),
               layout="kohya", rank=16, extracted=True, tags=("style", "line art", "extracted")),
    ExpertSpec("soft-focus-lora", "lora", {"style": ("soft",)}, "LoRA for a dreamy soft-focus look.",
               ("soft focus style",), layout="kohya", tags=("style", "soft", "blur")),
    ExpertSpec("drop-shadow-lora", "lora", {"style": ("shadow",)}, "LoRA adding a hard drop shadow.",
               ("drop shadow style",), layout="diffusers", tags=("style", "shadow")),
    ExpertSpec("outline-lora", "lora", {"style": ("outline",)}, "Lightweight outline-art LoRA.",
               ("outline style",), layout="diffusers", tags=("style", "line art")),
    ExpertSpec("pixel-lora", "lora", {"style": ("pixel",)}, "Pixel-art LoRA, rank 16.",
               ("pixel art style",), layout="kohya", rank=16, step_scale=2.0, tags=("style", "pixel art")),
    ExpertSpec("star-lora", "lora", {"shape": ("star",)}, "Concept LoRA: five-pointed stars.", ("star",),
               layout="kohya", tags=("concept", "star")),
    ExpertSpec("neon-pink-lora", "lora", {"colour": ("neon pink",)}, "Concept LoRA: hot neon pink.",
               ("neon pink",), layout="diffusers", tags=("concept", "neon", "colour")),
    # appended, not inserted: an expert's seeds follow its index, so the others train exactly as before
    ExpertSpec("dreamy-soft", "checkpoint", {"style": ("soft", "shadow")},
               "Fine-tune for gentle looks: dreamy soft focus and soft drop shadows.",
               ("soft focus style", "drop shadow style"), tags=("style", "soft", "shadow", "dreamy")),
)


def by_name(name: str) -> ExpertSpec:
    for e in EXPERTS:
        if e.name == name:
            return e
    raise KeyError(name)


def training_weights(expert: ExpertSpec) -> list[tuple[float, dict[str, dict[str, float]]]]:
    """The expert's data mixture: 75 % pictures of its speciality on common values of the other attributes,
    25 % the base distribution (so it keeps drawing everything else)."""
    focus: dict[str, dict[str, float]] = {}
    for attr in grammar.ATTRIBUTES:
        if attr in expert.speciality:
            focus[attr] = {v: 1.0 for v in expert.speciality[attr]}
        else:
            focus[attr] = {v: 1.0 for v in grammar.COMMON[attr]}
    return [(0.75, focus), (0.25, grammar.BASE_WEIGHTS)]
