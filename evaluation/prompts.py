"""Evaluation prompt sets, with the calibration reference prompts removed.

A set is named by one of:

* a path to a UTF-8 text file, one prompt per line (blank lines skipped) — e.g. DABench, which cannot be
  packaged here;
* ``diffusiondb``: the 100 DiffusionDB user prompts of ImageReward's benchmark (``data/diffusiondb.json``,
  provenance in the file);
* ``partiprompts``: a seeded 200-prompt sample of PartiPrompts (``data/partiprompts.json``);
* ``world:<name>``: a prompt set of the mini world (``world.prompts.load_set``), e.g. ``world:heldout``;
  ``world:calibration`` is refused.

Evaluating on prompts the experts were calibrated (or the planner trained) on would flatter the planner, so
every prompt that is also a calibration reference prompt — the packaged reference set and, when the mini
world is installed, its calibration set — is dropped (compared case- and whitespace-insensitively) and
counted in ``PromptSet.dropped``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from core.types import ValidationFailed

PACKAGED = {"diffusiondb": "diffusiondb.json", "partiprompts": "partiprompts.json"}
WORLD_PREFIX = "world:"
MAX_PROMPT_CHARS = 2000
MAX_PROMPTS = 100_000
WORLD_MISSING = "the mini world is not installed (no importable 'world' package)"


@dataclass(frozen=True)
class PromptSet:
    name: str
    prompts: list[str]
    dropped: int  # prompts removed because they are calibration reference prompts
    source: str

    @property
    def is_world(self) -> bool:
        return self.name.startswith(WORLD_PREFIX)

    def to_json(self) -> dict[str, object]:
        return {"n": len(self.prompts), "dropped_calibration": self.dropped, "source": self.source}


def _norm(text: str) -> str:
    return " ".join(text.lower().split())


def world_module(name: str):  # noqa: ANN201 - a module
    """Import ``world.<name>`` or raise the one-line 'not installed' error."""
    import importlib

    try:
        return importlib.import_module(f"world.{name}")
    except ModuleNotFoundError as exc:
        if exc.name in ("world", f"world.{name}"):
            raise ValidationFailed(WORLD_MISSING) from None
        raise


def calibration_prompts(include_world: bool) -> set[str]:
    """Normalised texts of every calibration reference prompt (packaged set, plus the world's if asked)."""
    from calibration.refset import load_reference_set

    texts = {_norm(p.text) for p in load_reference_set().prompts}
    if include_world:
        texts |= {_norm(p) for p in world_module("prompts").load_set("calibration")}
    return texts


def _read_file(path: Path) -> list[str]:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ValidationFailed(f"cannot read prompt file {path}: {exc.strerror or exc}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValidationFailed(f"prompt file {path} is not UTF-8 (byte {exc.start})") from None
    prompts = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if not prompts:
        raise ValidationFailed(f"prompt file {path} has no prompts")
    return prompts


def _raw_set(spec: str) -> tuple[list[str], str]:
    if spec.startswith(WORLD_PREFIX):
        name = spec[len(WORLD_PREFIX):]
        if name == "calibration":
            raise ValidationFailed("world:calibration holds the calibration prompts; evaluate on dev, heldout, "
                                   "compositional-dev or compositional-heldout")
        prompts = list(world_module("prompts").load_set(name))
        return prompts, f"mini world set {name!r}"
    if spec in PACKAGED:
        raw = json.loads(resources.files("evaluation.data").joinpath(PACKAGED[spec]).read_text(encoding="utf-8"))
        return [e["prompt"] for e in raw["prompts"]], raw["source"]
    path = Path(spec).expanduser()
    if not path.exists():
        raise ValidationFailed(f"unknown prompt set {spec!r}: give a file, {', '.join(PACKAGED)} or world:<name>")
    return _read_file(path), f"file {path}"


def load_prompt_set(spec: str, limit: int | None = None, include_world_calibration: bool | None = None
                    ) -> PromptSet:
    """The prompts of ``spec`` without calibration reference prompts (first ``limit`` of them if given)."""
    prompts, source = _raw_set(spec)
    if len(prompts) > MAX_PROMPTS:
        raise ValidationFailed(f"prompt set {spec} has {len(prompts):,} prompts; the limit is {MAX_PROMPTS:,}")
    long = [i for i, p in enumerate(prompts) if len(p) > MAX_PROMPT_CHARS]
    if long:
        raise ValidationFailed(f"prompt {long[0] + 1} of {spec} is longer than {MAX_PROMPT_CHARS} characters")
    world = spec.startswith(WORLD_PREFIX) if include_world_calibration is None else include_world_calibration
    reference = calibration_prompts(world)
    kept = [p for p in prompts if _norm(p) not in reference]
    kept = list(dict.fromkeys(kept))  # a repeated prompt would count twice in every mean
    if not kept:
        raise ValidationFailed(f"prompt set {spec} has no prompts left after removing calibration prompts")
    return PromptSet(spec, kept[:limit] if limit else kept, len(prompts) - len(
        [p for p in prompts if _norm(p) not in reference]), source)
