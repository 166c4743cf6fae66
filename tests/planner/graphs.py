"""Synthetic but real graphs for planner tests: experts and reference prompts written to the embedded store
with embeddings from the real embedder."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from core.settings import Settings
from core.types import Capability, Expert, ExpertKind, RefPrompt
from graphdb.store import store_session

CATEGORIES: dict[str, list[str]] = {
    "cats": [
        "a fluffy orange cat sleeping on a sofa",
        "a black kitten playing with a ball of yarn",
        "a tabby cat sitting on a windowsill in the sun",
        "portrait of a siamese cat with blue eyes",
        "two cats curled up together on a blanket",
        "a cat stretching on a wooden floor",
        "a grey cat hunting a mouse in the garden",  # held out
        "a white kitten drinking milk from a saucer",  # held out
    ],
    "mountains": [
        "snowy mountain peaks at sunrise",
        "a alpine lake surrounded by high mountains",
        "a rocky mountain ridge under storm clouds",
        "misty pine forest on a mountain slope",
        "a glacier flowing between steep mountains",
        "a hiker on a mountain summit above the clouds",
        "a volcano with snow on its peak at dusk",  # held out
        "a mountain valley with a winding river",  # held out
    ],
    "cars": [
        "a red sports car on a racing track",
        "a vintage car parked on a city street",
        "a sleek electric car in a showroom",
        "an off-road truck driving through mud",
        "a police car with flashing lights at night",
        "a convertible driving along a coastal highway",
        "a yellow taxi cab in heavy traffic",  # held out
        "a race car drifting around a corner",  # held out
    ],
    "food": [
        "a bowl of ramen noodles with egg",
        "a fresh pizza with basil and tomatoes",
        "a chocolate cake with strawberries",
        "a plate of sushi rolls",
        "a burger with fries on a wooden table",
        "a bowl of fruit salad with berries",
        "a stack of pancakes with maple syrup",  # held out
        "a steaming cup of coffee and a croissant",  # held out
    ],
}
N_TRAIN_PROMPTS = 6
EXPERTS_PER_CATEGORY = 3


def expert(
    expert_id: str,
    name: str,
    kind: str,
    skill: str,
    embedding: Sequence[float],
    family: str = "sd15",
    **extra: object,
) -> Expert:
    return Expert(
        id=expert_id,
        source=expert_id.split(":", 1)[0],
        name=name,
        kind=ExpertKind(kind),
        base_family=family,
        skill=skill,
        embedding=[float(x) for x in embedding],
        **extra,
    )


def planted_truth(expert_index: int, category_index: int) -> float:
    """Expected score: +0.55 on the expert's own category, plus a general quality spread over experts."""
    own = expert_index // EXPERTS_PER_CATEGORY == category_index
    quality = (expert_index * 5 % 12) / 11.0  # distinct per expert, not aligned with categories
    return 0.05 + 0.55 * own + 0.3 * quality


def build_planted_graph(
    settings: Settings, embedder, seed: int = 0, informative: bool = False
) -> dict[str, object]:
    """4 categories x 3 experts x 6 reference prompts, CAPABILITY scores = planted truth + small noise.

    Expert skill texts are deliberately uninformative (unless ``informative``), so only the graph structure
    can reveal strengths.
    Returns the expert ids, the held-out prompts per category and the truth function's inputs.
    """
    rng = np.random.default_rng(seed)
    cats = list(CATEGORIES)
    n_experts = len(cats) * EXPERTS_PER_CATEGORY
    skills = [
        f"pictures of {cats[i // EXPERTS_PER_CATEGORY]}, model {i}"
        if informative
        else f"community model number {i}"
        for i in range(n_experts)
    ]
    skill_vecs = embedder.encode(skills)
    experts = [
        expert(
            f"local:e{i:02d}", f"model {i}", "checkpoint" if i % 3 == 0 else "lora", skills[i], skill_vecs[i]
        )
        for i in range(n_experts)
    ]
    texts = [t for c in cats for t in CATEGORIES[c][:N_TRAIN_PROMPTS]]
    vecs = embedder.encode(texts)
    prompts = [
        RefPrompt(
            id=f"ref:{c}:{j}",
            category=c,
            text=CATEGORIES[c][j],
            embedding=vecs[ci * N_TRAIN_PROMPTS + j].tolist(),
        )
        for ci, c in enumerate(cats)
        for j in range(N_TRAIN_PROMPTS)
    ]
    caps = [
        Capability(
            expert_id=e.id,
            prompt_id=p.id,
            score=float(np.clip(planted_truth(i, cats.index(p.category)) + rng.normal(0, 0.02), 0, 1)),
        )
        for i, e in enumerate(experts)
        for p in prompts
    ]
    with store_session(settings) as store:
        store.upsert_experts(experts)
        store.upsert_ref_prompts(prompts)
        store.write_capabilities(caps)
    held_out = {c: CATEGORIES[c][N_TRAIN_PROMPTS:] for c in cats}
    return {"experts": experts, "categories": cats, "held_out": held_out}


THEMED = [
    # id, name, kind, family, skill, extra
    (
        "civitai:101",
        "Realistic Vision",
        "checkpoint",
        "sd15",
        "photorealistic photos of people, realistic portraits",
        {},
    ),
    (
        "civitai:102",
        "Anime Pastel Dream",
        "checkpoint",
        "sd15",
        "anime illustration, pastel colours, manga characters",
        {},
    ),
    (
        "civitai:103",
        "Fantasy World",
        "checkpoint",
        "sd15",
        "epic fantasy landscapes, castles and dragons, concept art",
        {},
    ),
    (
        "civitai:104",
        "XL Photo",
        "checkpoint",
        "sdxl",
        "photorealistic photos of people and street scenes",
        {},
    ),
    (
        "civitai:201",
        "Cyberpunk City",
        "lora",
        "sd15",
        "neon cyberpunk cityscapes at night",
        {"trained_words": ["cybrpnk"]},
    ),
    (
        "civitai:202",
        "Watercolor Style",
        "lora",
        "sd15",
        "watercolor painting style, soft washes of colour",
        {},
    ),
    ("civitai:203", "Cute Cats", "lora", "sd15", "cute cats and kittens", {}),
    (
        "civitai:204",
        "Watercolour Wash",
        "lora",
        "sd15",
        "watercolour painting, soft colour washes on paper",
        {},
    ),
    (
        "civitai:205",
        "Pixel Knight",
        "locon",
        "sd15",
        "pixel art sprites of knights",
        {"trained_words": ["pxknight"]},
    ),
    ("civitai:206", "Spicy", "lora", "sd15", "cute cats in lingerie", {"nsfw": True}),
    ("civitai:207", "XL Neon", "lora", "sdxl", "neon cyberpunk cityscapes at night", {}),
]


def build_themed_graph(settings: Settings, embedder) -> list[Expert]:
    """A handful of real-looking experts with skill embeddings from the real embedder (no calibration)."""
    vecs = embedder.encode([t[4] for t in THEMED])
    experts = [
        expert(eid, name, kind, skill, vec, family=fam, source_model_id=eid.split(":")[1], **extra)
        for (eid, name, kind, fam, skill, extra), vec in zip(THEMED, vecs, strict=True)
    ]
    with store_session(settings) as store:
        store.upsert_experts(experts)
    return experts
