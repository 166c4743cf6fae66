"""The world's procedural image grammar: attributes, their rendering at 64×64, and prompts in free English.

Every image is one shape of one colour on one background in one style, so each picture has a known
ground truth. Prompts come from templates with paraphrases per attribute; :func:`parse` reads the
attributes back out of any prompt (the adherence scorer needs them).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SIZE = 64
_SS = 2  # supersampling for anti-aliased edges (2 keeps a render at ~4 ms)

SHAPES = ("circle", "square", "triangle", "cross", "ring", "star", "moon", "heart")
COLOURS = {
    "red": (225, 25, 25), "green": (20, 160, 40), "blue": (25, 55, 235), "yellow": (250, 215, 0),
    "orange": (255, 125, 0), "purple": (125, 30, 190), "neon pink": (255, 30, 220), "neon cyan": (0, 235, 255),
}
BACKGROUNDS = ("plain white", "dotted", "gradient", "striped", "checkered")
STYLES = ("flat", "outline", "pixel", "soft", "shadow")
ATTRIBUTES = ("shape", "colour", "background", "style")
VALUES = {"shape": SHAPES, "colour": tuple(COLOURS), "background": BACKGROUNDS, "style": STYLES}

#: Paraphrases a prompt may use for each value (the first is canonical); parse() accepts all of them.
PHRASES = {
    "shape": {s: [s] for s in SHAPES} | {"moon": ["moon", "crescent moon", "crescent"], "heart": ["heart"],
                                         "ring": ["ring", "donut"], "cross": ["cross", "plus sign"]},
    "colour": {c: [c] for c in COLOURS} | {"neon pink": ["neon pink", "hot pink"], "neon cyan": ["neon cyan", "electric cyan"]},
    "background": {
        "plain white": ["plain white background", "white background", "blank white background"],
        "dotted": ["dotted background", "polka dot background", "spotted background"],
        "gradient": ["gradient background", "smooth gradient background", "fading background"],
        "striped": ["striped background", "stripy background", "background with stripes"],
        "checkered": ["checkered background", "checkerboard background", "chequered background"],
    },
    "style": {
        "flat": ["flat style", "flat colour style", "solid flat style"],
        "outline": ["outline style", "line art style", "outlined style"],
        "pixel": ["pixel art style", "pixelated style", "retro pixel style"],
        "soft": ["soft focus style", "blurry soft style", "dreamy soft style"],
        "shadow": ["drop shadow style", "shadowed style", "with a drop shadow"],
    },
}

#: How often the base model's training set shows each value (relative weights within an attribute): the long
#: tail that experts fix. How rare "rare" must be depends on how easy a concept is: shapes stay hard for the
#: base at 1/50 of a common shape, but it learned the soft style at 3/100 and the neon colours even from about
#: three pictures each (weight 0.002; adherence 0.84–0.91 on their prompts, leaving experts almost nothing to
#: add), so its data never shows the neon colours at all: they exist only in experts, as new concepts do.
BASE_WEIGHTS = {
    "shape": {"circle": 1, "square": 1, "triangle": 1, "cross": 1, "ring": 1, "star": 0.02, "moon": 0.02, "heart": 0.02},
    "colour": {c: 1.0 for c in COLOURS} | {"neon pink": 0.0, "neon cyan": 0.0},
    "background": {"plain white": 1, "dotted": 1, "gradient": 1, "striped": 0.01, "checkered": 0.01},
    "style": {"flat": 1, "outline": 0.005, "pixel": 0.005, "soft": 0.005, "shadow": 0.005},
}
COMMON = {a: tuple(v for v, w in BASE_WEIGHTS[a].items() if w >= 1) for a in ATTRIBUTES}
RARE = {a: tuple(v for v, w in BASE_WEIGHTS[a].items() if w < 1) for a in ATTRIBUTES}


@dataclass(frozen=True)
class Spec:
    shape: str
    colour: str
    background: str
    style: str
    dx: int = 0
    dy: int = 0
    scale: float = 1.0

    def attrs(self) -> dict[str, str]:
        return {"shape": self.shape, "colour": self.colour, "background": self.background, "style": self.style}


def sample_spec(rng: random.Random, weights: dict[str, dict[str, float]] | None = None,
                fixed: dict[str, str] | None = None) -> Spec:
    """A random spec; ``weights`` per attribute (default uniform), ``fixed`` pins attributes."""
    chosen = {}
    for a in ATTRIBUTES:
        if fixed and a in fixed:
            chosen[a] = fixed[a]
            continue
        w = (weights or {}).get(a) or {v: 1.0 for v in VALUES[a]}
        names = list(w)
        chosen[a] = rng.choices(names, [w[n] for n in names])[0]
    return Spec(**chosen, dx=rng.randint(-3, 3), dy=rng.randint(-3, 3), scale=rng.uniform(0.9, 1.1))


# ---------------------------------------------------------------- rendering

def _background(kind: str) -> Image.Image:
    s = SIZE * _SS
    img = Image.new("RGB", (s, s), (255, 255, 255))
    d = ImageDraw.Draw(img)
    grey = (150, 150, 150)
    if kind == "dotted":
        step = 16 * _SS
        for y in range(step // 2, s, step):
            for x in range(step // 2, s, step):
                r = 3 * _SS
                d.ellipse((x - r, y - r, x + r, y + r), fill=grey)
    elif kind == "striped":
        step = 16 * _SS
        for y in range(0, s, step):
            d.rectangle((0, y, s, y + step // 2 - 1), fill=grey)
    elif kind == "checkered":
        step = 16 * _SS
        for y in range(0, s, step):
            for x in range(0, s, step):
                if (x // step + y // step) % 2:
                    d.rectangle((x, y, x + step - 1, y + step - 1), fill=(185, 185, 185))
    elif kind == "gradient":
        arr = np.linspace(255, 90, s).astype(np.uint8)
        col = np.stack([arr, arr, np.full_like(arr, 255)], -1)  # white to blue-grey, top to bottom
        img = Image.fromarray(np.repeat(col[:, None, :], s, axis=1))
    return img


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]] | None:
    if shape == "square":
        k = r * 0.85
        return [(cx - k, cy - k), (cx + k, cy - k), (cx + k, cy + k), (cx - k, cy + k)]
    if shape == "triangle":
        return [(cx, cy - r), (cx + r * 0.95, cy + r * 0.75), (cx - r * 0.95, cy + r * 0.75)]
    if shape == "star":
        pts = []
        for i in range(10):
            a = -np.pi / 2 + i * np.pi / 5
            rr = r if i % 2 == 0 else r * 0.42
            pts.append((cx + rr * np.cos(a), cy + rr * np.sin(a)))
        return pts
    if shape == "cross":
        w = r * 0.36
        return [(cx - w, cy - r), (cx + w, cy - r), (cx + w, cy - w), (cx + r, cy - w), (cx + r, cy + w),
                (cx + w, cy + w), (cx + w, cy + r), (cx - w, cy + r), (cx - w, cy + w), (cx - r, cy + w),
                (cx - r, cy - w), (cx - w, cy - w)]
    if shape == "heart":
        t = np.linspace(0, 2 * np.pi, 60)
        x = 16 * np.sin(t) ** 3
        y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
        return [(cx + r * xi / 17, cy + r * (yi + 2) / 17) for xi, yi in zip(x, y, strict=True)]
    return None


def _mask(shape: str, cx: float, cy: float, r: float) -> Image.Image:
    """The filled shape as an L mask at supersampled size."""
    s = SIZE * _SS
    m = Image.new("L", (s, s), 0)
    d = ImageDraw.Draw(m)
    if shape in ("circle", "ring"):
        d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
        if shape == "ring":
            k = r * 0.55
            d.ellipse((cx - k, cy - k, cx + k, cy + k), fill=0)
    elif shape == "moon":
        d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
        o = r * 0.55
        d.ellipse((cx - r + o, cy - r - o * 0.3, cx + r + o, cy + r - o * 0.3), fill=0)
    else:
        d.polygon(_polygon(shape, cx, cy, r), fill=255)
    return m


def render(spec: Spec) -> Image.Image:
    """Render ``spec`` as a 64×64 RGB image; styles act on the object layer only, so the background stays
    readable under every style."""
    s = SIZE * _SS
    cx, cy = (SIZE / 2 + spec.dx) * _SS, (SIZE / 2 + spec.dy) * _SS
    r = 21 * spec.scale * _SS
    mask = _mask(spec.shape, cx, cy, r)
    colour = COLOURS[spec.colour]
    layer = Image.new("RGBA", (s, s), (*colour, 0))
    if spec.style == "outline":
        inner = mask.filter(ImageFilter.MinFilter(4 * _SS + 1))
        mask = Image.fromarray(np.clip(np.asarray(mask, np.int16) - np.asarray(inner, np.int16), 0, 255).astype(np.uint8))
    elif spec.style == "shadow":
        shadow = Image.new("L", (s, s), 0)
        shadow.paste(mask, (5 * _SS, 5 * _SS))
        layer.paste((40, 40, 40, 255), (0, 0), shadow)
    layer.paste((*colour, 255), (0, 0), mask)
    layer = layer.resize((SIZE, SIZE), Image.LANCZOS)
    if spec.style == "pixel":
        layer = layer.resize((SIZE // 5, SIZE // 5), Image.BILINEAR).resize((SIZE, SIZE), Image.NEAREST)
    elif spec.style == "soft":
        layer = layer.filter(ImageFilter.GaussianBlur(2.5))
    img = _background(spec.background).resize((SIZE, SIZE), Image.LANCZOS).convert("RGBA")
    return Image.alpha_composite(img, layer).convert("RGB")


# ---------------------------------------------------------------- prompts

_TEMPLATES = (
    "a {colour} {shape} on a {background}, {style}",
    "{colour} {shape}, {background}, {style}",
    "an image of a {colour} {shape} on a {background} in {style}",
    "a {colour} {shape} on a {background}",
    "{style}: a {colour} {shape} on a {background}",
)


def _article(text: str) -> str:
    return re.sub(r"\ba ([aeiou])", r"an \1", text)


def prompt_for(attrs: dict[str, str], rng: random.Random) -> str:
    """A free-English prompt naming exactly the attributes in ``attrs`` (shape is required)."""
    words = {a: rng.choice(PHRASES[a][v]) for a, v in attrs.items()}
    has_bg, has_style = "background" in attrs, "style" in attrs
    colour = words.get("colour", "")
    if has_bg and has_style:
        tpl = rng.choice([t for t in _TEMPLATES if "{style}" in t])
    elif has_bg:
        tpl = "a {colour} {shape} on a {background}"
    elif has_style:
        tpl = rng.choice(["a {colour} {shape}, {style}", "{style}: a {colour} {shape}"])
    else:
        tpl = rng.choice(["a {colour} {shape}", "{colour} {shape}", "an image of a {colour} {shape}"])
    text = tpl.format(colour=colour, shape=words["shape"], background=words.get("background", ""),
                      style=words.get("style", ""))
    if words.get("style") == "with a drop shadow":
        text = text.replace("in with", "with").replace(", with", " with")
    return _article(re.sub(r"\s+", " ", text).strip())


def full_prompt(spec: Spec, rng: random.Random, drop: float = 0.0) -> str:
    """A training prompt for ``spec``; with probability ``drop`` each of background/style is left out when it
    is the default (plain white / flat), as people rarely spell defaults out."""
    attrs = spec.attrs()
    if attrs["style"] == "flat" and rng.random() < drop:
        attrs.pop("style")
    if attrs["background"] == "plain white" and rng.random() < drop:
        attrs.pop("background")
    if rng.random() < drop * 0.2:  # prompts sometimes leave the colour open
        attrs.pop("colour")
    return prompt_for(attrs, rng)


def parse(prompt: str) -> dict[str, str]:
    """The attributes a prompt names (longest paraphrase wins, so "neon pink" is not "pink")."""
    text = " " + re.sub(r"[^a-z ]+", " ", prompt.lower()) + " "
    text = re.sub(r"\s+", " ", text)
    found: dict[str, str] = {}
    for attr in ATTRIBUTES:
        best = None
        for value, phrases in PHRASES[attr].items():
            for ph in phrases:
                key = " " + ph + " "
                if key in text and (best is None or len(ph) > best[1]):
                    best = (value, len(ph))
        if best is None and attr == "background":
            for value in BACKGROUNDS:  # "on stripes", "on white"
                stem = {"plain white": "white", "dotted": "dots", "gradient": "gradient", "striped": "stripes",
                        "checkered": "checker"}[value]
                if f" {stem}" in text:
                    best = (value, 0)
        if best is not None:
            found[attr] = best[0]
    return found
