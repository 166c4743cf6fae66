"""Candidate retrieval: the step of the Expert Selection Agent that turns a prompt into ranked experts.

The prompt and its requirement terms are embedded; one ``GraphStore.candidates`` call per kind (top-k
cosine over skill embeddings, within one base family) gathers a pool for a blend of the prompt and its
terms; each pooled expert is then re-scored against every query embedding as

    fused = (1 - TERM_WEIGHT) * cos(prompt, e) + TERM_WEIGHT * max_t cos(term_t, e)
            + TRIGGER_BOOST  if one of the expert's trained words appears verbatim in the prompt
            + POPULARITY_WEIGHT * popularity
            - AVOID_PENALTY * max(0, max_a cos(avoid_a, e) - AVOID_FLOOR)

so ``Candidate.score`` here is this fused score, not a bare cosine. The nsfw filter comes from
``settings.allow_nsfw``; licence filters from ``require_commercial_use`` / ``require_derivatives`` when the
settings define them.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from core.embeddings import Embedder, get_embedder
from core.settings import Settings
from core.types import MAX_PROMPT_CHARS, Expert, ExpertKind, ValidationFailed
from graphdb.backends import store_session
from graphdb.store import Candidate, CandidateFilter, GraphStore
from planner.parse import QUALITY_TERMS, parse_offline
from planner.requirements import Requirements

TERM_WEIGHT = 0.35
TRIGGER_BOOST = 0.15
POPULARITY_WEIGHT = 0.05
AVOID_PENALTY = 0.5
AVOID_FLOOR = 0.35
MIN_POOL = 40
FAMILY_POOL = 20
DEFAULT_FAMILY = "sd15"
# Trained words so common that matching them says nothing about the expert.
_GENERIC_TRIGGERS = frozenset({"1girl", "1boy", "girl", "boy", "solo", "woman", "man", *QUALITY_TERMS})


def validate_prompt(text: str) -> str:
    """The prompt stripped; ``ValidationFailed`` when empty or longer than ``MAX_PROMPT_CHARS``."""
    if not isinstance(text, str) or not text.strip():
        raise ValidationFailed("prompt is empty")
    if len(text) > MAX_PROMPT_CHARS:
        raise ValidationFailed(f"prompt is too long ({len(text)} characters, at most {MAX_PROMPT_CHARS})")
    return text.strip()


@dataclass(frozen=True)
class Query:
    """A prompt with the embeddings of its requirement terms."""

    text: str
    prompt_vec: np.ndarray  # (d,)
    term_vecs: np.ndarray  # (t, d), subjects and styles
    avoid_vecs: np.ndarray  # (a, d)
    terms: tuple[str, ...] = ()  # the texts of term_vecs

    @classmethod
    def build(cls, embedder: Embedder, prompt: str, req: Requirements) -> Query:
        terms = req.positive_terms()
        avoid = list(req.avoid)
        vecs = embedder.encode([prompt, *terms, *avoid])
        return cls(prompt, vecs[0], vecs[1 : 1 + len(terms)], vecs[1 + len(terms) :], tuple(terms))

    def explain(self, expert: Expert) -> str:
        """Why ``expert`` matches: its best-matching requirement term and any trigger word in the prompt."""
        parts = []
        if self.terms and expert.embedding is not None and len(expert.embedding) == len(self.prompt_vec):
            v = np.asarray(expert.embedding, dtype=np.float32)
            sims = self.term_vecs @ (v / max(float(np.linalg.norm(v)), 1e-12))
            best = int(np.argmax(sims))
            parts.append(f"closest requirement {self.terms[best]!r} (cosine {float(sims[best]):.2f})")
        hits = trigger_matches(expert, self.text.lower())
        if hits:
            parts.append(f"trigger word {hits[0]!r} in the prompt")
        return "; ".join(parts)

    def pool_vector(self) -> np.ndarray:
        """One pooling query per kind (each store round trip costs ~20 ms at 10k experts): the prompt
        blended with the mean of its terms, weighted like the fused score."""
        if not len(self.term_vecs):
            return self.prompt_vec
        mean = self.term_vecs.mean(axis=0)
        mean = mean / max(float(np.linalg.norm(mean)), 1e-12)
        blend = (1 - TERM_WEIGHT) * self.prompt_vec + TERM_WEIGHT * mean
        return blend / max(float(np.linalg.norm(blend)), 1e-12)


def candidate_filter(settings: Settings, exclude: Sequence[str] = ()) -> CandidateFilter:
    return CandidateFilter(
        allow_nsfw=settings.allow_nsfw,
        require_commercial_use=settings.require_commercial_use,
        require_derivatives=settings.require_derivatives,
        exclude_ids=frozenset(exclude),
    )


def trigger_matches(expert: Expert, prompt_lower: str) -> list[str]:
    """The expert's (non-generic) trained words that occur verbatim in the prompt."""
    hits = []
    for raw in expert.trained_words:
        for word in raw.split(","):
            w = word.strip().lower()
            if (
                len(w) >= 3
                and w not in _GENERIC_TRIGGERS
                and re.search(rf"(?<!\w){re.escape(w)}(?!\w)", prompt_lower)
            ):
                hits.append(w)
    return hits


def _expert_matrix(experts: Sequence[Expert], dim: int) -> np.ndarray:
    rows = np.zeros((len(experts), dim), dtype=np.float32)
    for i, e in enumerate(experts):
        if e.embedding is not None and len(e.embedding) == dim:
            rows[i] = e.embedding
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    return rows / np.maximum(norms, 1e-12)


def fused_scores(experts: Sequence[Expert], query: Query) -> np.ndarray:
    """The fused score (module docstring) of each expert for ``query``."""
    if not experts:
        return np.zeros(0, dtype=np.float32)
    emb = _expert_matrix(experts, query.prompt_vec.shape[0])
    s_prompt = emb @ query.prompt_vec
    s_terms = (emb @ query.term_vecs.T).max(axis=1) if len(query.term_vecs) else s_prompt
    score = (1 - TERM_WEIGHT) * s_prompt + TERM_WEIGHT * s_terms
    if len(query.avoid_vecs):
        score -= AVOID_PENALTY * np.clip((emb @ query.avoid_vecs.T).max(axis=1) - AVOID_FLOOR, 0.0, None)
    lower = query.text.lower()
    for i, e in enumerate(experts):
        if trigger_matches(e, lower):
            score[i] += TRIGGER_BOOST
        score[i] += POPULARITY_WEIGHT * min(max(e.popularity, 0.0), 1.0)
    return score


def rank_experts(
    store: GraphStore,
    query: Query,
    kind: ExpertKind | str | None,
    family: str | None,
    k: int,
    filters: CandidateFilter,
) -> list[Candidate]:
    """Top-``k`` experts of ``kind`` within ``family`` (``None`` = any) by fused score, best first."""
    if k <= 0:
        return []
    pool = store.candidates(
        query.pool_vector(), kind=kind, base_family=family, k=max(MIN_POOL, 4 * k), filters=filters
    )
    experts = sorted((c.expert for c in pool), key=lambda e: e.id)
    scores = fused_scores(experts, query)
    order = sorted(range(len(experts)), key=lambda i: (-float(scores[i]), experts[i].id))[:k]
    return [Candidate(experts[i], round(float(scores[i]), 6)) for i in order]


def choose_family(
    store: GraphStore, query: Query, settings: Settings, hint: str | None, filters: CandidateFilter
) -> tuple[str, str]:
    """The one base family to plan in, and why: the hint, else the family with the best candidates
    (restricted to ``settings.base_models`` when that is configured), else ``DEFAULT_FAMILY``."""
    if hint:
        return hint, f"family {hint}: named in the prompt"
    allowed = set(settings.base_models) or None
    if allowed is not None and len(allowed) == 1:
        (only,) = allowed
        return only, f"family {only}: the only configured base model"
    by_family: dict[str, list[float]] = {}
    for cand in store.candidates(
        query.prompt_vec, kind=None, base_family=None, k=FAMILY_POOL, filters=filters
    ):
        fam = cand.expert.base_family
        if allowed is None or fam in allowed:
            by_family.setdefault(fam, []).append(cand.score)
    if by_family:
        best = max(sorted(by_family), key=lambda f: sum(sorted(by_family[f], reverse=True)[:3]))
        return best, f"family {best}: best-matching candidates"
    return DEFAULT_FAMILY, f"family {DEFAULT_FAMILY}: default (no candidates)"


def _kind_arg(kind: str | None) -> ExpertKind | None:
    if kind is None:
        return None
    try:
        return ExpertKind(kind.lower())
    except ValueError:
        raise ValidationFailed(f"unknown expert kind {kind!r}: use checkpoint or lora") from None


def search_many(
    settings: Settings,
    texts: Sequence[str],
    kind: str | None = None,
    family: str | None = None,
    k: int = 10,
    embedder: Embedder | None = None,
) -> list[list[Candidate]]:
    """``search_experts`` for several texts in one store session (batch evaluation)."""
    embedder = embedder or get_embedder(settings)
    kind_arg = _kind_arg(kind)
    queries = [Query.build(embedder, t, parse_offline(t)) for t in (validate_prompt(x) for x in texts)]
    with store_session(settings) as store:
        filters = candidate_filter(settings)
        return [rank_experts(store, q, kind_arg, family, k, filters) for q in queries]


def search_experts(
    settings: Settings, text: str, kind: str | None = None, family: str | None = None, k: int = 10
) -> list[Candidate]:
    """The retrieval ranking for ``text`` (the same scoring ESA uses, offline requirements parse).

    ``kind`` is ``checkpoint`` or ``lora`` (all adapter kinds); ``family`` restricts to one base family
    (``None`` searches all families). Scores are fused scores (see the module docstring).
    """
    return search_many(settings, [text], kind=kind, family=family, k=k)[0]
