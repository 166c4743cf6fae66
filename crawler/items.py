"""What spiders yield: one raw source record per expert version (normalised later, in pipelines)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from core.types import Expert


@dataclass(repr=False)
class SourceRecord:
    """One expert version as the source returned it.

    ``model`` is the Civitai model object (or the Hub model-info response), ``version`` the Civitai
    model version (``None`` for the Hub), ``card`` the Hub README model card text. Pipelines fill in
    ``expert`` (normalise/validate), ``status`` (graph upsert: new | updated | unchanged) and ``timings``.
    """

    source: str
    version_id: str
    model: dict[str, Any]
    version: dict[str, Any] | None = None
    card: str | None = None
    content_hash: str = ""
    url: str = ""
    fields: dict[str, Any] | None = None
    expert: Expert | None = None
    status: str = ""
    anomalies: list[str] = field(default_factory=list)

    def __repr__(self) -> str:  # Scrapy logs dropped items: keep it to one short line
        return f"<SourceRecord {self.source}:{self.version_id} status={self.status or '-'}>"
