"""The packaged, versioned reference prompt set that experts are calibrated on.

The prompts live in ``calibration/data/refset_v1.json`` (built by ``calibration/build_refset.py`` from real
DiffusionDB and PartiPrompts prompts; each entry records its dataset, file and row). The set's version is
derived from its content (``v1-<8 hex>``), so any edit to a prompt changes the version and marks every
expert as uncalibrated for the new set.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from typing import TYPE_CHECKING, Any

from core.types import RefPrompt

if TYPE_CHECKING:
    from core.settings import Settings
    from graphdb.store import GraphStore

DATA_FILE = "refset_v1.json"
_EMBEDDINGS: dict[tuple[str, str], Any] = {}  # (embedding model, set version) -> vectors, per process
GENERATION = "v1"


@dataclass(frozen=True)
class ReferenceSet:
    version: str
    prompts: list[RefPrompt]

    @property
    def categories(self) -> list[str]:
        return sorted({p.category for p in self.prompts})

    def subset(self, n: int | None) -> list[RefPrompt]:
        """The first ``n`` prompts spread over categories (round-robin), so a small ``n`` still covers many."""
        if not n or n >= len(self.prompts):
            return list(self.prompts)
        by_cat: dict[str, list[RefPrompt]] = {}
        for p in self.prompts:
            by_cat.setdefault(p.category, []).append(p)
        out: list[RefPrompt] = []
        depth = 0
        while len(out) < n:
            for cat in by_cat:
                if depth < len(by_cat[cat]) and len(out) < n:
                    out.append(by_cat[cat][depth])
            depth += 1
        return out


def _provenance(entry: dict[str, Any], datasets: dict[str, Any]) -> str:
    ds = datasets.get(entry["dataset"], {}).get("name", entry["dataset"])
    extra = f" id {entry['source_id']}" if entry.get("source_id") else ""
    return f"{ds}: {entry['file']} row {entry['row']}{extra}"


def content_version(entries: list[dict[str, Any]]) -> str:
    canonical = json.dumps([[e["id"], e["category"], e["text"]] for e in entries], ensure_ascii=False)
    return f"{GENERATION}-{hashlib.sha256(canonical.encode()).hexdigest()[:8]}"


@lru_cache(maxsize=1)
def load_reference_set() -> ReferenceSet:
    """The reference set shipped with the package (id, category, text and provenance per prompt)."""
    raw = json.loads(resources.files("calibration.data").joinpath(DATA_FILE).read_text(encoding="utf-8"))
    entries: list[dict[str, Any]] = raw["prompts"]
    version = content_version(entries)
    prompts = [
        RefPrompt(id=e["id"], category=e["category"], text=e["text"], set_version=version,
                  source=_provenance(e, raw.get("datasets", {})))
        for e in entries
    ]
    return ReferenceSet(version=version, prompts=prompts)


@lru_cache(maxsize=1)
def world_reference_set() -> ReferenceSet:
    """The mini world's calibration prompts as a reference set (category = the attribute value the prompt
    names that is rarest for the world's base, so categories line up with expert specialities)."""
    from world import grammar
    from world.prompts import load_set

    entries = []
    for i, text in enumerate(load_set("calibration")):
        parsed = grammar.parse(text)
        rare = [v for a, v in parsed.items() if v in grammar.RARE[a]]
        entries.append({"id": f"world-{i:03d}", "category": rare[0] if rare else "common", "text": text})
    version = content_version(entries).replace(GENERATION, "world", 1)
    prompts = [RefPrompt(id=e["id"], category=e["category"], text=e["text"], set_version=version,
                         source="world.prompts calibration set") for e in entries]
    return ReferenceSet(version=version, prompts=prompts)


def reference_set_for(settings: Settings) -> ReferenceSet:
    """The set ``settings.calib_refset`` names: ``""`` the packaged set, ``"world"`` the mini world's."""
    if settings.calib_refset == "world":
        return world_reference_set()
    if settings.calib_refset:
        from core.types import DiffGraphError

        raise DiffGraphError(f"unknown calib_refset {settings.calib_refset!r} (use '' or 'world')")
    return load_reference_set()


def ensure_ref_prompts(settings: Settings, store: GraphStore, refset: ReferenceSet | None = None) -> int:
    """Embed the reference prompts and upsert them as ``:RefPrompt`` nodes (idempotent); returns the count.

    Skips the embedding when every prompt of this version is already stored.
    """
    refset = refset or load_reference_set()
    have = {p.id for p in store.list_ref_prompts(refset.version)}
    if have >= {p.id for p in refset.prompts}:
        return 0
    key = (settings.embedding_model, refset.version)
    if key not in _EMBEDDINGS:
        from core.embeddings import get_embedder

        _EMBEDDINGS[key] = get_embedder(settings).encode([p.text for p in refset.prompts])
    vectors = _EMBEDDINGS[key]
    rows = [p.model_copy(update={"embedding": [float(x) for x in v]}) for p, v in zip(refset.prompts, vectors,
                                                                                      strict=True)]
    return store.upsert_ref_prompts(rows)
