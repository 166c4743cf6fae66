"""The search corpus: every expert of a graph in process memory, with a dense matrix and a BM25 index.

Both backends hand retrieval the same ``SearchCorpus`` (``GraphStore.search_corpus()``), so they rank
identically. A corpus is built from ``find_experts`` once per *data version* — a token that every write
renews (LadybugDB: the ``Meta {key: 'data_version'}`` node; Neo4j: the ``:Meta`` node) — and cached per
database in this process, so a search session pays for it once and a write by any process invalidates it.

The lexical side is ``bm25s`` (sparse BM25, Lucene variant) over one document per expert version: name,
version name, tags and trained words (twice: short and decisive), the description's lead and the
showcase prompts. Scoring itself lives in ``planner.retrieval``.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from core.types import Expert, ExpertKind
from graphdb.rules import commercial_use_ok
from graphdb.store import CandidateFilter

DESCRIPTION_CHARS = 1500  # the lead of a description; the rest is mostly usage notes and changelogs
MAX_CACHED = 4  # corpora kept per process (one per database path / URI)
_TOKEN = re.compile(r"[^\W_]{2,}", re.UNICODE)
# English function words plus prompt filler that every showcase prompt shares.
STOPWORDS = frozenset(
    "a an the and or of to in on at by for with from into is are was be it its this that as but not no "
    "very 1girl 1boy solo girl boy woman man lora".split()
)
# Trained words so common that a match says nothing about the expert.
GENERIC_TRIGGERS = frozenset(
    {"1girl", "1boy", "girl", "boy", "solo", "woman", "man", "masterpiece", "best quality", "high quality",
     "realistic", "photorealistic", "anime", "detailed", "portrait", "lora", "style"}
)
_FILE_SUFFIX = re.compile(r"\.(?:safetensors|ckpt|pt|pth|bin)$", re.IGNORECASE)


def tokenize(text: str) -> list[str]:
    """Lower-cased word tokens (letters/digits, 2+ characters) without stopwords."""
    return [t for t in _TOKEN.findall(text.lower()) if t not in STOPWORDS]


def word_tokens(text: str) -> list[str]:
    """Every lower-cased word token (stopwords kept): what trained words are matched against."""
    return _TOKEN.findall(text.lower())


def model_key(expert: Expert) -> str:
    """The model an expert version belongs to (versions of one model share it)."""
    return f"{expert.source}:model:{expert.source_model_id}" if expert.source_model_id else expert.id


def lexical_text(expert: Expert) -> str:
    """The BM25 document of one expert version."""
    names = " ".join([expert.name, expert.version_name])
    words = " ".join([*expert.tags, *expert.trained_words])
    return "\n".join(
        [names, names, words, words, expert.description[:DESCRIPTION_CHARS], *expert.showcase_prompts]
    )


def file_stem(name: str) -> str:
    return _FILE_SUFFIX.sub("", name.strip()).lower()


@dataclass
class SearchCorpus:
    """Experts sorted by id with the arrays retrieval scores and filters on."""

    version: str
    experts: list[Expert]  # without their embedding (one float matrix holds those; see ``expert``)
    dense: np.ndarray  # (n, d) L2-normalised float32; zero rows for experts without an embedding
    has_embedding: np.ndarray
    labels: np.ndarray  # "Checkpoint" | "LoRA"
    families: np.ndarray
    nsfw: np.ndarray
    commercial: np.ndarray
    derivatives: np.ndarray
    popularity: np.ndarray  # clipped to [0, 1]
    model_keys: np.ndarray
    model_codes: np.ndarray  # int code per model key (versions of one model share it)
    bm25: Any  # bm25s.BM25 or None when the corpus is empty
    triggers: list[tuple[str, ...]]  # normalised trained words per expert
    _masks: dict[tuple[str | None, str | None], np.ndarray] = field(default_factory=dict)
    _lookup: dict[str, dict[str, int]] | None = None
    _trigger_index: dict[str, list[tuple[int, str]]] | None = None

    def __len__(self) -> int:
        return len(self.experts)

    @property
    def dim(self) -> int:
        return int(self.dense.shape[1])

    def expert(self, row: int) -> Expert:
        """The expert of ``row`` with its (normalised) embedding attached."""
        e = self.experts[row]
        return e.model_copy(update={"embedding": self.dense[row].tolist()}) if self.has_embedding[row] else e

    def slice_mask(self, kind: ExpertKind | str | None, family: str | None) -> np.ndarray:
        """Rows of one kind group (``None``: all; adapters are one group) and base family (cached)."""
        group = None if kind in (None, "") else ExpertKind(str(kind).lower()).label
        key = (group, family or None)
        if key not in self._masks:
            mask = self.has_embedding.copy()
            if group is not None:
                mask &= self.labels == group
            if family:
                mask &= self.families == family
            self._masks[key] = mask
        return self._masks[key]

    def filter_mask(self, filters: CandidateFilter) -> np.ndarray:
        mask = np.ones(len(self.experts), dtype=bool)
        if not filters.allow_nsfw:
            mask &= ~self.nsfw
        if filters.require_commercial_use:
            mask &= self.commercial
        if filters.require_derivatives:
            mask &= self.derivatives
        if filters.exclude_ids:
            mask &= ~np.isin(np.asarray([e.id for e in self.experts], dtype=object), list(filters.exclude_ids))
        return mask

    def lexical_scores(self, tokens: Sequence[str]) -> np.ndarray:
        """BM25 score of every expert for the query tokens (zeros when none is in the vocabulary)."""
        if self.bm25 is None or not tokens:
            return np.zeros(len(self.experts), dtype=np.float32)
        known = [t for t in tokens if t in self.bm25.vocab_dict]
        if not known:
            return np.zeros(len(self.experts), dtype=np.float32)
        return np.asarray(self.bm25.get_scores(known), dtype=np.float32)

    def trigger_hits(self, tokens: Sequence[str]) -> np.ndarray:
        """Whether one of each expert's distinctive trained words occurs, as whole words, in the query
        tokens. Indexed by a trigger's first token, so a query costs a few dict lookups, not one regex per
        expert (that was the throughput bottleneck of batch search)."""
        if self._trigger_index is None:
            index: dict[str, list[tuple[int, str]]] = {}
            for row, words in enumerate(self.triggers):
                for w in words:
                    if len(w) >= 3 and w not in GENERIC_TRIGGERS:
                        index.setdefault(w.split(" ", 1)[0], []).append((row, w))
            self._trigger_index = index
        hits = np.zeros(len(self.experts), dtype=bool)
        padded = None
        for tok in set(tokens):
            for row, phrase in self._trigger_index.get(tok, ()):
                if " " not in phrase:
                    hits[row] = True
                    continue
                padded = padded if padded is not None else f" {' '.join(tokens)} "
                if f" {phrase} " in padded:
                    hits[row] = True
        return hits

    def find(self, ref: str) -> int | None:
        """The row named by ``ref`` (a ``<lora:ref:w>`` tag): a weight file name (with or without its
        extension), else a model name, else an expert id or source version id; case-insensitive. Among
        several versions the newest-id one wins (the lookup tables are built in id order)."""
        if self._lookup is None:
            files: dict[str, int] = {}
            names: dict[str, int] = {}
            ids: dict[str, int] = {}
            for i, e in enumerate(self.experts):
                for f in e.files:
                    files[file_stem(f.name)] = i
                names[e.name.strip().lower()] = i
                ids[e.id.lower()] = i
                if e.source_version_id:
                    ids.setdefault(e.source_version_id.lower(), i)
            self._lookup = {"file": files, "name": names, "id": ids}
        key = ref.strip().lower()
        for table, k in (("file", file_stem(key)), ("name", key), ("id", key)):
            if k in self._lookup[table]:
                return self._lookup[table][k]
        return None


def _normalised_triggers(expert: Expert) -> tuple[str, ...]:
    words = []
    for raw in expert.trained_words:
        for w in raw.split(","):
            toks = _TOKEN.findall(w.lower().replace("_", " "))
            if toks:
                words.append(" ".join(toks))
    return tuple(dict.fromkeys(words))


def build_corpus(experts: Sequence[Expert], version: str = "") -> SearchCorpus:
    """A ``SearchCorpus`` of ``experts`` (any order; duplicates by id keep the last)."""
    import bm25s

    by_id = {e.id: e for e in experts}
    ordered = [by_id[i] for i in sorted(by_id)]
    dims = [len(e.embedding) for e in ordered if e.embedding]
    dim = max(set(dims), key=dims.count) if dims else 384
    dense = np.zeros((len(ordered), dim), dtype=np.float32)
    has = np.zeros(len(ordered), dtype=bool)
    for i, e in enumerate(ordered):
        if e.embedding and len(e.embedding) == dim:
            dense[i] = e.embedding
            has[i] = True
    dense /= np.maximum(np.linalg.norm(dense, axis=1, keepdims=True), 1e-12)
    keys = np.asarray([model_key(e) for e in ordered], dtype=object)
    bm25 = None
    if ordered:
        bm25 = bm25s.BM25()
        bm25.index([tokenize(lexical_text(e)) or ["_"] for e in ordered], show_progress=False)
    return SearchCorpus(
        version=version,
        # a Python float list per expert would cost ~12 KB each (1.2 GB at 100k experts)
        experts=[e.model_copy(update={"embedding": None}) for e in ordered],
        dense=dense,
        has_embedding=has,
        labels=np.asarray([e.label for e in ordered], dtype=object),
        families=np.asarray([e.base_family for e in ordered], dtype=object),
        nsfw=np.asarray([e.nsfw for e in ordered], dtype=bool),
        commercial=np.asarray([commercial_use_ok(e.allow_commercial_use) for e in ordered], dtype=bool),
        derivatives=np.asarray([e.allow_derivatives for e in ordered], dtype=bool),
        popularity=np.clip(np.asarray([e.popularity for e in ordered], dtype=np.float32), 0.0, 1.0),
        model_keys=keys,
        model_codes=np.unique(keys.astype(str), return_inverse=True)[1].astype(np.int64) if len(keys) else
        np.zeros(0, dtype=np.int64),
        bm25=bm25,
        triggers=[_normalised_triggers(e) for e in ordered],
    )


_CACHE: dict[str, SearchCorpus] = {}
_LOCK = threading.Lock()


def cached_corpus(key: str, version: str, load: Callable[[], Sequence[Expert]]) -> SearchCorpus:
    """The corpus of database ``key`` at data ``version``: cached, rebuilt from ``load()`` when the
    version changed (or was never seen)."""
    with _LOCK:
        hit = _CACHE.get(key)
        if hit is not None and version and hit.version == version:
            return hit
    corpus = build_corpus(load(), version)
    with _LOCK:
        _CACHE.pop(key, None)
        _CACHE[key] = corpus
        while len(_CACHE) > MAX_CACHED:
            _CACHE.pop(next(iter(_CACHE)))
    return corpus


ALL_EXPERTS = 10**9  # ``find_experts`` limit that means "every expert"
