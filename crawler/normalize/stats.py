"""Source statistics → downloads, likes, rating and a popularity score in [0, 1]."""

from __future__ import annotations

import math
from dataclasses import dataclass

# log-scaled downloads saturate at ten million (the most downloaded Civitai checkpoints are ~1e6-1e7).
_SATURATION = math.log1p(1e7)


@dataclass(frozen=True)
class Popularity:
    downloads: int = 0
    likes: int = 0
    rating: float = 0.0
    popularity: float = 0.0


def _int(value: object) -> int:
    try:
        return max(0, int(value))  # type: ignore[call-overload]
    except (TypeError, ValueError):
        return 0


def _float(value: object) -> float:
    try:
        f = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return 0.0
    return f if math.isfinite(f) else 0.0


def normalize_stats(stats: object) -> Popularity:
    """``0.8·log-downloads + 0.2·rating/5`` (the rating only counts when someone rated)."""
    s = stats if isinstance(stats, dict) else {}
    downloads = _int(s.get("downloadCount", s.get("downloads")))
    likes = _int(s.get("favoriteCount") or s.get("thumbsUpCount") or s.get("likes"))
    rating = min(5.0, max(0.0, _float(s.get("rating"))))
    rated = _int(s.get("ratingCount")) > 0
    pop = 0.8 * min(1.0, math.log1p(downloads) / _SATURATION) + (0.2 * rating / 5.0 if rated else 0.0)
    return Popularity(downloads, likes, rating, round(min(1.0, pop), 6))
