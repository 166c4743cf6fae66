"""The table's metrics and the scorers behind them.

| metric | scorer (``DIFFGRAPH_SCORER_PATHS`` key) | definition |
|---|---|---|
| ``ir`` | ImageReward (``imagereward``) | BLIP image-grounded text encoder + MLP, standardised reward |
| ``hps`` | HPSv2 (``hpsv2``) | cosine of OpenCLIP ViT-H-14 image and text embeddings |
| ``as`` | LAION aesthetic predictor (``aesthetic``) | MLP over the normalised CLIP ViT-L/14 image embedding |
| ``ps`` | PickScore (``pickscore``) | ``logit_scale · cos`` of its CLIP-H embeddings |
| ``cs`` | CLIP score (``clip``); on ``world:`` sets the mini world's ``clip_score`` | ``100 · cos`` |
| ``adherence`` | the mini world's ``adherence`` (``world:`` sets only) | the world's own definition |

A scorer with no configured weights is reported unavailable with its reason (its cells show ``n/a``); one
whose weights are configured but do not load (a missing or corrupt file, a missing tokenizer, a pickle
without ``DIFFGRAPH_ALLOW_PICKLE``) is an error before any image is generated: the user asked for that
metric with those weights, and a column of ``n/a`` after a long run is the wrong place to learn of a typo.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from core.types import ValidationFailed

if TYPE_CHECKING:
    from PIL.Image import Image

    from core.settings import Settings

SCORER_OF = {"ir": "imagereward", "hps": "hpsv2", "as": "aesthetic", "ps": "pickscore", "cs": "clip"}
WORLD_METRICS = {"cs": "clip_score", "adherence": "adherence"}
METRICS = (*SCORER_OF, "adherence")
DEFAULT_METRICS = ("ir", "hps", "as", "ps", "cs")


@dataclass(frozen=True)
class MetricScorer:
    """One metric on one kind of prompt set (``world`` or ``standard``)."""

    name: str
    version: str
    impl: Any  # a calibration Scorer or a world scoring function

    def score(self, images: Sequence[Image], prompts: Sequence[str]) -> list[float]:
        if hasattr(self.impl, "score"):
            return [float(v) for v in self.impl.score(list(images), list(prompts))]
        return [float(v) for v in self.impl(list(images), list(prompts))]


@dataclass(frozen=True)
class Unavailable:
    name: str
    reason: str


def check_names(what: str, names: list[str], known: Iterable[str]) -> list[str]:
    """``names`` without repeats, or a one-line error for the first unknown one (or for none at all)."""
    known = list(known)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValidationFailed(f"unknown {what} {unknown[0]!r}: use {', '.join(known)}")
    if not names:
        raise ValidationFailed(f"no {what} given")
    return list(dict.fromkeys(names))


def check_metrics(names: list[str]) -> list[str]:
    return check_names("metric", names, METRICS)


def load_metrics(settings: Settings, names: list[str], world: bool, standard: bool
                 ) -> dict[tuple[str, bool], MetricScorer | Unavailable]:
    """``{(metric, is_world_set): scorer or Unavailable}`` for the kinds of sets being evaluated.

    Raises ``ScorerError`` (one line) when configured weights do not load.
    """
    from calibration.scorers import LOADERS, ScorerError
    from calibration.scorers import Unavailable as ScorerUnavailable

    out: dict[tuple[str, bool], MetricScorer | Unavailable] = {}
    for name in names:
        if world and name in WORLD_METRICS:
            from evaluation.prompts import world_module

            fn = getattr(world_module("scorers"), WORLD_METRICS[name])
            out[(name, True)] = MetricScorer(name, f"world:{WORLD_METRICS[name]}", fn)
        for kind in [k for k, on in ((True, world), (False, standard)) if on and (name, k) not in out]:
            if name == "adherence":
                out[(name, kind)] = Unavailable(name, "adherence is defined on the mini world's prompt sets")
                continue
            key = SCORER_OF[name]
            loaded = LOADERS[key](settings)
            if isinstance(loaded, ScorerUnavailable) and settings.scorer_paths.get(key):
                raise ScorerError(f"metric {name}: the {key} weights configured in scorer_paths do not load: "
                                  f"{loaded.reason}")
            if isinstance(loaded, ScorerUnavailable):
                out[(name, kind)] = Unavailable(name, loaded.reason)
            else:
                out[(name, kind)] = MetricScorer(name, loaded.version, loaded)
    return out
