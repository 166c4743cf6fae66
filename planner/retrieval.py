"""Candidate retrieval: the step of the Expert Selection Agent that turns a prompt into ranked experts.

The prompt is cleaned (``core.prompt_syntax.clean_query``: weight markup, ``<lora:…>`` tags, embedding
names and quality boilerplate removed), embedded with its requirement terms, and every expert of the
wanted kind and base family in the graph's search corpus (``GraphStore.search_corpus``, see
``graphdb/search.py``) is scored as

    dense   = (1 - TERM_WEIGHT) * cos(prompt, e) + TERM_WEIGHT * max_t cos(term_t, e)
    fused   = dense
            + LEXICAL_WEIGHT * bm25(prompt, e) / max_e' bm25(prompt, e')     (BM25 over name, tags,
                                        trained words, description and showcase prompts)
            + TRIGGER_BOOST  if one of the expert's distinctive trained words is in the prompt
            + POPULARITY_WEIGHT * popularity
            - AVOID_PENALTY * max(0, max_a cos(avoid_a, e) - AVOID_FLOOR)

so ``Candidate.score`` here is this fused score, not a bare cosine. The prompt is embedded up to
``QUERY_EMBED_CHARS``; batch search (``search_groups``) leaves the requirement terms out (``t`` empty, so
``dense = cos(prompt, e)``): on the dev split they did not change recall and cost most of the encoding. Versions of one model compete for one
place: the best-scoring version represents its model (``rank_groups`` keeps the others under it).
The weights were set on the dev split of ``benchmarks/retrieval.py`` (showcase images with even ids; see
README, "Retrieval"); the held-out odd ids were never used. The nsfw filter comes from
``settings.allow_nsfw``; licence filters from ``require_commercial_use`` / ``require_derivatives``.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from core.embeddings import Embedder, get_embedder
from core.prompt_syntax import clean_query, has_content, strip_syntax
from core.settings import Settings
from core.types import MAX_PROMPT_CHARS, Expert, ExpertKind, ValidationFailed
from graphdb.backends import store_session
from graphdb.search import GENERIC_TRIGGERS, SearchCorpus, tokenize, word_tokens
from graphdb.store import Candidate, CandidateFilter, GraphStore
from planner.parse import parse_offline
from planner.requirements import Requirements

TERM_WEIGHT = 0.35
LEXICAL_WEIGHT = 0.5
TRIGGER_BOOST = 0.1
POPULARITY_WEIGHT = 0.05
AVOID_PENALTY = 0.5
AVOID_FLOOR = 0.35
FAMILY_POOL = 20
DEFAULT_FAMILY = "sd15"
PAIR_FEATURES = ("prompt_cosine", "term_cosine", "trigger_hit")  # Query.pair_features, for the VGAE decoder
# Cleaned prompts are embedded up to this many characters (cut at a word): MiniLM's cost grows with tokens
# and the subject sits at the front of real prompts; the lexical side always sees the whole prompt.
QUERY_EMBED_CHARS = 200


def validate_prompt(text: str) -> str:
    """The prompt stripped; ``ValidationFailed`` when empty or longer than ``MAX_PROMPT_CHARS``."""
    if not isinstance(text, str) or not text.strip():
        raise ValidationFailed("prompt is empty")
    if len(text) > MAX_PROMPT_CHARS:
        raise ValidationFailed(f"prompt is too long ({len(text)} characters, at most {MAX_PROMPT_CHARS})")
    return text.strip()


def search_text(text: str) -> str:
    """The cleaned query that search ranks on; ``ValidationFailed`` when the text is empty, too long, or
    nothing but markup and quality boilerplate (ranking that would return arbitrary experts)."""
    cleaned = clean_query(validate_prompt(text))
    if not has_content(cleaned):
        raise ValidationFailed(
            "query is only quality boilerplate or prompt markup (e.g. 'masterpiece, best quality'): "
            "say what should be drawn"
        )
    return cleaned


def query_text(prompt: str) -> str:
    """What ESA embeds: the cleaned prompt, else (all boilerplate) the prompt without markup."""
    cleaned = clean_query(prompt)
    return cleaned if has_content(cleaned) else (strip_syntax(prompt) or prompt)


@contextmanager
def _one_torch_thread() -> Iterator[None]:
    """Encode queries on one intra-op thread: they are short, and a second thread spins instead of helping
    (651 dev queries: 1.6 s with one thread, 11-15 s with two on the shared 2-core box)."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _cut_words(text: str, cap: int) -> str:
    if len(text) <= cap:
        return text
    cut = text[:cap]
    return cut[: cut.rfind(" ")] if " " in cut else cut


@dataclass(frozen=True)
class Query:
    """A cleaned prompt with its embeddings, lexical tokens and the embeddings of its requirement terms."""

    text: str
    prompt_vec: np.ndarray  # (d,)
    term_vecs: np.ndarray  # (t, d), subjects and styles
    avoid_vecs: np.ndarray  # (a, d)
    terms: tuple[str, ...] = ()  # the texts of term_vecs
    tokens: tuple[str, ...] = ()  # BM25 tokens of text
    words: tuple[str, ...] = ()  # every word of text (trained-word matching)

    @classmethod
    def build(cls, embedder: Embedder, prompt: str, req: Requirements) -> Query:
        return cls.build_many(embedder, [prompt], [req])[0]

    @classmethod
    def build_many(
        cls, embedder: Embedder, prompts: Sequence[str], reqs: Sequence[Requirements], with_terms: bool = True
    ) -> list[Query]:
        """Queries for several prompts with one ``encode`` call (batch search). ``with_terms=False`` skips
        the requirement terms (things to avoid are kept): on the dev split they moved Recall@10 by less
        than 0.005 while costing most of the encoding time, so batch search leaves them out."""
        texts = [query_text(p) for p in prompts]
        spans, flat = [], []
        for text, req in zip(texts, reqs, strict=True):
            terms, avoid = (req.positive_terms() if with_terms else []), list(req.avoid)
            spans.append((len(flat), terms, avoid))
            flat += [_cut_words(text, QUERY_EMBED_CHARS), *terms, *avoid]
        with _one_torch_thread():
            vecs = embedder.encode(flat) if flat else np.zeros((0, 0), dtype=np.float32)
        out = []
        for text, (at, terms, avoid) in zip(texts, spans, strict=True):
            t, a = len(terms), len(avoid)
            out.append(
                cls(
                    text,
                    vecs[at],
                    vecs[at + 1 : at + 1 + t],
                    vecs[at + 1 + t : at + 1 + t + a],
                    tuple(terms),
                    tuple(tokenize(text)),
                    tuple(word_tokens(text)),
                )
            )
        return out

    def pair_features(self, expert: Expert) -> list[float]:
        """The (expert, prompt) pair's own evidence, in ``PAIR_FEATURES`` order: the cosine of the expert's
        skill embedding to the prompt, to the prompt's closest requirement term (the prompt again when it
        has none), and 1.0 when one of the expert's distinctive trained words is in the prompt."""
        hit = 1.0 if trigger_matches(expert, self.text.lower()) else 0.0
        v = unit_embedding(expert, len(self.prompt_vec))
        if v is None:
            return [0.0, 0.0, hit]
        s_prompt = float(self.prompt_vec @ v)
        s_terms = float((self.term_vecs @ v).max()) if len(self.term_vecs) else s_prompt
        return [s_prompt, s_terms, hit]

    def explain(self, expert: Expert) -> str:
        """Why ``expert`` matches: its best-matching requirement term and any trigger word in the prompt."""
        parts = []
        v = unit_embedding(expert, len(self.prompt_vec)) if self.terms else None
        if v is not None:
            sims = self.term_vecs @ v
            best = int(np.argmax(sims))
            parts.append(f"closest requirement {self.terms[best]!r} (cosine {float(sims[best]):.2f})")
        hits = trigger_matches(expert, self.text.lower())
        if hits:
            parts.append(f"trigger word {hits[0]!r} in the prompt")
        return "; ".join(parts)


def unit_embedding(expert: Expert, dim: int) -> np.ndarray | None:
    """The expert's skill embedding at unit length, or ``None`` when it has none of ``dim`` dimensions (an
    expert embedded by another model)."""
    if expert.embedding is None or len(expert.embedding) != dim:
        return None
    v = np.asarray(expert.embedding, dtype=np.float32)
    return v / max(float(np.linalg.norm(v)), 1e-12)


def candidate_filter(settings: Settings, exclude: Sequence[str] = ()) -> CandidateFilter:
    return CandidateFilter(
        allow_nsfw=settings.allow_nsfw,
        require_commercial_use=settings.require_commercial_use,
        require_derivatives=settings.require_derivatives,
        exclude_ids=frozenset(exclude),
    )


@lru_cache(maxsize=4096)
def _trigger_patterns(trained_words: tuple[str, ...]) -> tuple[tuple[str, re.Pattern[str]], ...]:
    """Compiled whole-word patterns of an expert's distinctive trained words (cached per word list)."""
    out = []
    for raw in trained_words:
        for word in raw.split(","):
            w = word.strip().lower()
            if len(w) >= 3 and w not in GENERIC_TRIGGERS:
                out.append((w, re.compile(rf"(?<!\w){re.escape(w)}(?!\w)")))
    return tuple(out)


def trigger_matches(expert: Expert, prompt_lower: str) -> list[str]:
    """The expert's (non-generic) trained words that occur verbatim in the prompt."""
    return [w for w, pattern in _trigger_patterns(tuple(expert.trained_words)) if pattern.search(prompt_lower)]


def fused_scores(corpus: SearchCorpus, rows: np.ndarray, query: Query) -> np.ndarray:
    """The fused score (module docstring) of the corpus ``rows`` for ``query``."""
    if len(rows) == 0:
        return np.zeros(0, dtype=np.float32)
    emb = corpus.dense  # products over the whole matrix, then rows: a row slice would copy it per query
    s_prompt = (emb @ query.prompt_vec)[rows]
    s_terms = (emb @ query.term_vecs.T)[rows].max(axis=1) if len(query.term_vecs) else s_prompt
    score = (1 - TERM_WEIGHT) * s_prompt + TERM_WEIGHT * s_terms
    if len(query.avoid_vecs):
        avoid = (emb @ query.avoid_vecs.T)[rows].max(axis=1)
        score -= AVOID_PENALTY * np.clip(avoid - AVOID_FLOOR, 0.0, None)
    lexical = corpus.lexical_scores(query.tokens)[rows]
    top = float(lexical.max()) if len(lexical) else 0.0
    if top > 0:
        score += LEXICAL_WEIGHT * lexical / top
    score += TRIGGER_BOOST * corpus.trigger_hits(query.words)[rows]
    score += POPULARITY_WEIGHT * corpus.popularity[rows]
    return score.astype(np.float32)


def rank_groups(
    corpus: SearchCorpus,
    query: Query,
    kind: ExpertKind | str | None,
    family: str | None,
    k: int,
    filters: CandidateFilter,
    all_versions: bool = False,
) -> list[list[Candidate]]:
    """The ``k`` best models (``all_versions``: versions) of ``kind`` within ``family`` (``None`` = any),
    best first; each group lists its model's matching versions, best first (one when ``all_versions``)."""
    if k <= 0 or len(corpus) == 0:
        return []
    if len(query.prompt_vec) != corpus.dim:
        raise ValidationFailed(
            f"the query embedding has {len(query.prompt_vec)} dimensions, the graph stores {corpus.dim}: "
            "search with the embedder the graph was built with"
        )
    rows = np.nonzero(corpus.slice_mask(kind, family) & corpus.filter_mask(filters))[0]
    if len(rows) == 0:
        return []
    scores = np.round(fused_scores(corpus, rows, query), 6)
    pos = np.lexsort((rows, -scores))  # rows are in id order: ties go to the smaller id
    order, ordered = rows[pos], scores[pos]
    if all_versions:
        return [[Candidate(corpus.expert(int(r)), float(v))] for r, v in zip(order[:k], ordered[:k], strict=True)]
    codes = corpus.model_codes[order]
    _, first = np.unique(codes, return_index=True)  # where each model's best version sits in the order
    chosen = codes[np.sort(first)[:k]]
    groups: dict[int, list[Candidate]] = {int(c): [] for c in chosen}
    for i in np.nonzero(np.isin(codes, chosen))[0]:  # every version of a chosen model, best first
        groups[int(codes[i])].append(Candidate(corpus.expert(int(order[i])), float(ordered[i])))
    return list(groups.values())


def rank_experts(
    store: GraphStore,
    query: Query,
    kind: ExpertKind | str | None,
    family: str | None,
    k: int,
    filters: CandidateFilter,
) -> list[Candidate]:
    """Top-``k`` models of ``kind`` within ``family`` (``None`` = any) by fused score, best first, each
    represented by its best version (ESA never spends two places on one model)."""
    return [g[0] for g in rank_groups(store.search_corpus(), query, kind, family, k, filters)]


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


def search_groups(
    settings: Settings,
    texts: Sequence[str],
    kind: str | None = None,
    family: str | None = None,
    k: int = 10,
    embedder: Embedder | None = None,
    all_versions: bool = False,
) -> list[list[list[Candidate]]]:
    """``rank_groups`` for several texts: one store session, one corpus, one batched ``encode``.

    Raises ``ValidationFailed`` for the first bad text (``search_text``) before any work is done.
    """
    kind_arg = _kind_arg(kind)
    cleaned = [search_text(t) for t in texts]
    embedder = embedder or get_embedder(settings)
    queries = Query.build_many(embedder, cleaned, [parse_offline(t) for t in cleaned], with_terms=False)
    with store_session(settings) as store:
        corpus = store.search_corpus()
    filters = candidate_filter(settings)
    return [rank_groups(corpus, q, kind_arg, family, k, filters, all_versions) for q in queries]


def search_many(
    settings: Settings,
    texts: Sequence[str],
    kind: str | None = None,
    family: str | None = None,
    k: int = 10,
    embedder: Embedder | None = None,
) -> list[list[Candidate]]:
    """``search_experts`` for several texts in one store session (batch evaluation)."""
    groups = search_groups(settings, texts, kind=kind, family=family, k=k, embedder=embedder)
    return [[g[0] for g in ranking] for ranking in groups]


def search_experts(
    settings: Settings, text: str, kind: str | None = None, family: str | None = None, k: int = 10
) -> list[Candidate]:
    """The retrieval ranking for ``text`` (ESA's scoring without the requirement terms, see the module
    docstring): one result per model, its best version.

    ``kind`` is ``checkpoint`` or ``lora`` (all adapter kinds); ``family`` restricts to one base family
    (``None`` searches all families). Scores are fused scores (see the module docstring).
    """
    return search_many(settings, [text], kind=kind, family=family, k=k)[0]
