"""Register: a skill description per expert (LLM when configured, extractive offline) and its embedding,
computed in batches."""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor

from scrapy.exceptions import DropItem

from core.embeddings import get_embedder
from core.llm import get_llm
from core.settings import Settings
from core.types import Expert
from crawler.breaker import breaker_for
from crawler.items import SourceRecord
from crawler.pipelines.base import BatchStage
from crawler.skills import (
    SYSTEM_PROMPT,
    SkillReport,
    embedding_text,
    llm_user_message,
    offline_report,
    sanitize_report,
    skill_text,
)

log = logging.getLogger(__name__)
LLM_THREADS = 4
LLM_BREAKER_FAILURES = 3
LLM_BREAKER_RESET_S = 60.0


def describe(settings: Settings, experts: list[Expert]) -> tuple[list[SkillReport], int]:
    """One validated report per expert and how many fell back to the offline description."""
    llm = get_llm(settings)
    if llm is None:
        return [offline_report(e) for e in experts], 0
    # an endpoint that failed LLM_BREAKER_FAILURES times in a row is skipped for LLM_BREAKER_RESET_S
    breaker = breaker_for("LLM endpoint", settings.llm_base_url, LLM_BREAKER_FAILURES, LLM_BREAKER_RESET_S)

    def one(expert: Expert) -> tuple[SkillReport, bool]:
        reply = llm.structured(SYSTEM_PROMPT, llm_user_message(expert), SkillReport, breaker=breaker)
        return (sanitize_report(reply), False) if reply is not None else (offline_report(expert), True)

    with ThreadPoolExecutor(max_workers=min(LLM_THREADS, max(1, len(experts)))) as pool:
        results = list(pool.map(one, experts))
    return [r for r, _ in results], sum(1 for _, fell_back in results if fell_back)


def register_experts(settings: Settings, experts: list[Expert], timings: dict[str, float] | None = None) -> list[Expert]:
    """Experts with ``skill``/``skills``/``subjects``/``styles`` and ``embedding`` filled in (one batch).

    ``timings`` (if given) receives ``describe``/``embed`` seconds and ``llm_fallback`` counts.
    """
    t0 = time.perf_counter()
    reports, fallbacks = describe(settings, experts)
    texts = [skill_text(e, r) for e, r in zip(experts, reports, strict=True)]
    t1 = time.perf_counter()
    vectors = get_embedder(settings).encode([embedding_text(e, r) for e, r in zip(experts, reports, strict=True)])
    if timings is not None:
        timings["describe"] = t1 - t0
        timings["embed"] = time.perf_counter() - t1
        timings["llm_fallback"] = fallbacks
    return [
        e.model_copy(update={"skill": t, "skills": r.skills, "subjects": r.subjects, "styles": r.styles,
                             "embedding": v.tolist()})
        for e, r, t, v in zip(experts, reports, texts, vectors, strict=True)
    ]


class RegisterPipeline(BatchStage):
    stage = "register"

    def open_spider(self) -> None:
        # Load the model on the stage's worker thread while the first pages download: it takes seconds,
        # and the first batch, queued on the same thread, waits for it.
        self.worker.submit(self._load)

    def _load(self) -> None:
        start = time.perf_counter()
        get_embedder(self.settings)
        self.stats.inc_value("diffgraph/time/register.load", time.perf_counter() - start)

    def flush(self, items: list[SourceRecord]) -> list[DropItem | None]:
        timings: dict[str, float] = {}
        registered = register_experts(self.settings, [i.expert for i in items], timings)  # type: ignore[misc]
        self.stats.inc_value("diffgraph/time/register.describe", timings["describe"])
        self.stats.inc_value("diffgraph/time/register.embed", timings["embed"])
        if timings["llm_fallback"]:
            self.stats.inc_value("diffgraph/anomaly/llm_fallback", int(timings["llm_fallback"]))
        for item, expert in zip(items, registered, strict=True):
            item.expert = expert
        return [None] * len(items)
