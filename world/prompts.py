"""The world's prompt sets, deterministic and mutually disjoint.

* ``calibration`` — what DiffGraph calibrates experts on (every attribute value appears);
* ``dev`` / ``heldout`` — general prompts for tuning and for final figures;
* ``compositional-dev`` / ``compositional-heldout`` — prompts that need two specialities at once
  (e.g. a star on stripes in neon), the case where choosing the right experts matters.
"""

from __future__ import annotations

import random
from functools import cache

from world import grammar

SETS = ("calibration", "dev", "heldout", "compositional-dev", "compositional-heldout")
_SIZES = {"calibration": 60, "dev": 48, "heldout": 48, "compositional-dev": 24, "compositional-heldout": 24}


def _general(rng: random.Random) -> str:
    spec = grammar.sample_spec(rng)
    attrs = spec.attrs()
    for optional in ("background", "style"):
        if rng.random() < 0.3:
            attrs.pop(optional)
    return grammar.prompt_for(attrs, rng)


def _compositional(rng: random.Random) -> str:
    """Two rare values from different attributes, the rest common."""
    a1, a2 = rng.sample([a for a in grammar.ATTRIBUTES if grammar.RARE[a]], 2)
    attrs = {a: rng.choice(grammar.COMMON[a]) for a in grammar.ATTRIBUTES}
    attrs[a1] = rng.choice(grammar.RARE[a1])
    attrs[a2] = rng.choice(grammar.RARE[a2])
    if attrs["style"] == "flat" and rng.random() < 0.5:
        attrs.pop("style")
    return grammar.prompt_for(attrs, rng)


@cache
def _all_sets() -> dict[str, tuple[str, ...]]:
    rng = random.Random(1234)
    seen: set[str] = set()
    out: dict[str, tuple[str, ...]] = {}
    for name in SETS:
        make = _compositional if name.startswith("compositional") else _general
        chosen: list[str] = []
        while len(chosen) < _SIZES[name]:
            p = make(rng)
            if p not in seen:
                seen.add(p)
                chosen.append(p)
        out[name] = tuple(chosen)
    return out


def load_set(name: str) -> list[str]:
    """The prompts of one named set (see module docstring)."""
    sets = _all_sets()
    if name not in sets:
        raise KeyError(f"unknown world prompt set {name!r}; known: {', '.join(SETS)}")
    return list(sets[name])


def common_prompts(n: int = 40, seed: int = 77) -> list[str]:
    """Prompts made only of concepts well represented in the base's training data (for base adherence)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        attrs = {a: rng.choice(grammar.COMMON[a]) for a in grammar.ATTRIBUTES}
        if rng.random() < 0.5:
            attrs.pop("style")
        out.append(grammar.prompt_for(attrs, rng))
    return out


def speciality_prompts(speciality: dict[str, tuple[str, ...]], n: int = 24, seed: int = 78) -> list[str]:
    """Short prompts naming one speciality value and one common attribute (shape or colour)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        attr = sorted(speciality)[i % len(speciality)]
        attrs = {attr: speciality[attr][i % len(speciality[attr])]}
        other = "colour" if attr == "shape" else "shape"
        attrs[other] = rng.choice(grammar.COMMON[other])
        attrs.setdefault("shape", rng.choice(grammar.COMMON["shape"]))
        out.append(grammar.prompt_for(attrs, rng))
    return out
