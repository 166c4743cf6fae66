"""Stable Diffusion prompt syntax, shared by search, the offline requirements parser and registration.

Real prompts (A1111/ComfyUI style) carry markup that says nothing about *what* is drawn and, embedded
as is, dominates a sentence embedding:

* weight syntax ``(word:1.2)``, ``((word))``, ``[word]``, ``{word}``, ``[from:to:0.5]`` and ``BREAK``;
* network tags ``<lora:name:0.8>`` / ``<lyco:…>`` / ``<hypernet:…>`` (parsed: a tag naming a known
  expert selects it in ESA) and textual-inversion embeddings (``embedding:name``, well-known names);
* quality boilerplate ("masterpiece, best quality, 8k, ultra-detailed, absurdres …").

``strip_syntax`` removes the markup only; ``clean_query`` also removes the boilerplate. Both bound their
input (prompts are untrusted text) and never raise on odd input.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

MAX_SYNTAX_CHARS = 20_000  # longer input is cut before any regex runs

_NETWORK_TAG = re.compile(r"<\s*(lora|lyco|hypernet)\s*:([^<>]{0,300})>", re.IGNORECASE)
_EMBEDDING_REF = re.compile(r"\b(?:embedding|textual_inversion):[\w.\-]{1,100}", re.IGNORECASE)
# Textual-inversion names that show up in prompts (mostly negatives pasted into the positive prompt).
_KNOWN_EMBEDDINGS = re.compile(
    r"(?<![\w-])(?:easynegative|easynegativev2|ng_deepnegative_v1_75t|badhandv4|bad[-_]hands[-_]5|"
    r"bad[-_]artist(?:[-_]anime)?|bad[-_]prompt(?:[-_]version2)?|bad[-_]image[-_]v2[-_]39000|"
    r"verybadimagenegative_v1\.3|negative_hand(?:[-_]neg)?|unaestheticxl\w*|fastnegativev2|"
    r"bad_pictures|deepnegative\w*)(?![\w-])",
    re.IGNORECASE,
)
_BREAK = re.compile(r"\bBREAK\b")
_WEIGHT_NUMBER = re.compile(r":\s*-?\d+(?:\.\d+)?")  # the ":1.2" of "(word:1.2)" / "[a:b:0.5]"
_BRACKETS = re.compile(r"[()\[\]{}]")
_ESCAPES = re.compile(r"\\(?=[()\[\]{}])")
_SEPARATORS = re.compile(r"\s*[,|]\s*(?:[,|]\s*)*")
_SPACES = re.compile(r"[ \t\r\f\v]+")

# Quality/rendering boilerplate: phrases that appear in prompts for every kind of image.
BOILERPLATE = (
    "masterpiece", "masterpieces", "best quality", "high quality", "highest quality", "top quality",
    "good quality", "normal quality", "low quality", "worst quality", "amazing quality", "great quality",
    "ultra detailed", "ultra-detailed", "ultradetailed", "extremely detailed", "highly detailed",
    "hyper detailed", "hyperdetailed", "very detailed", "intricate details", "intricate detail",
    "extremely detailed cg", "extremely detailed cg unity 8k wallpaper", "unity 8k wallpaper",
    "8k wallpaper", "official art", "illustration quality", "4k", "8k", "16k", "uhd", "hdr", "hd",
    "8k uhd", "4k uhd", "highres", "high res", "high resolution", "absurdres", "incredibly absurdres",
    "huge filesize", "sharp focus", "award winning", "award-winning", "trending on artstation",
    "beautiful detailed", "best aesthetic", "aesthetic", "very aesthetic", "score_9", "score_8_up",
    "score_7_up", "score_6_up", "score_5_up", "score_4_up", "source_anime",
)
_BOILERPLATE = re.compile(
    r"(?<![\w-])(?:" + "|".join(re.escape(b) for b in sorted(BOILERPLATE, key=len, reverse=True)) + r")(?![\w-])",
    re.IGNORECASE,
)
_WORD = re.compile(r"[^\W_]", re.UNICODE)


@dataclass(frozen=True)
class NetworkTag:
    """One ``<lora:name:weight>`` (or lyco/hypernet) tag; ``weight`` is ``None`` when absent or unreadable."""

    kind: str
    name: str
    weight: float | None


def network_tags(text: str) -> list[NetworkTag]:
    """The ``<lora:…>``-style tags of ``text``, in order (at most 32)."""
    tags: list[NetworkTag] = []
    for m in _NETWORK_TAG.finditer(text[:MAX_SYNTAX_CHARS]):
        parts = [p.strip() for p in m.group(2).split(":")]
        name = parts[0][:200]
        if not name:
            continue
        weight = None
        if len(parts) > 1:
            try:
                weight = float(parts[1])
            except ValueError:
                weight = None
            if weight is not None and weight != weight:  # NaN
                weight = None
        tags.append(NetworkTag(m.group(1).lower(), name, weight))
        if len(tags) >= 32:
            break
    return tags


def strip_network_tags(text: str) -> str:
    """``text`` without ``<lora:…>``/``<lyco:…>``/``<hypernet:…>`` tags (what is sampled once ESA has
    taken the tags into the plan)."""
    out = _NETWORK_TAG.sub(" ", text[:MAX_SYNTAX_CHARS])
    return _SPACES.sub(" ", re.sub(r"\s*,\s*(?:,\s*)+", ", ", out)).strip(" ,")


def strip_syntax(text: str) -> str:
    """``text`` without network tags, embedding names, weight markup and ``BREAK``; words kept, separators
    normalised to ``", "``; underscores of booru tags become spaces."""
    t = text[:MAX_SYNTAX_CHARS]
    t = _NETWORK_TAG.sub(",", t)
    t = _EMBEDDING_REF.sub(",", t)
    t = _KNOWN_EMBEDDINGS.sub(",", t)
    t = _BREAK.sub(",", t)
    t = _ESCAPES.sub("", t)
    t = _WEIGHT_NUMBER.sub("", t)
    t = _BRACKETS.sub(",", t)
    t = t.replace("_", " ")
    t = _SPACES.sub(" ", t)
    t = _SEPARATORS.sub(", ", t)
    return t.strip(" ,\n")


def clean_query(text: str) -> str:
    """``strip_syntax`` plus quality boilerplate removed: the part of a prompt that says what is drawn.
    Empty when nothing else is left (see ``is_boilerplate_only``)."""
    t = _BOILERPLATE.sub(",", strip_syntax(text))
    t = _SEPARATORS.sub(", ", _SPACES.sub(" ", t))
    return t.strip(" ,\n")


def has_content(text: str) -> bool:
    """Whether ``text`` has at least one letter or digit."""
    return _WORD.search(text) is not None
