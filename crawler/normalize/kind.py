"""Source model types → ``ExpertKind``."""

from __future__ import annotations

from core.types import ExpertKind

_KINDS = {
    "checkpoint": ExpertKind.checkpoint,
    "lora": ExpertKind.lora,
    "dora": ExpertKind.lora,
    "locon": ExpertKind.locon,
    "lycoris": ExpertKind.locon,
    "loha": ExpertKind.loha,
    "lokr": ExpertKind.lokr,
    "textualinversion": ExpertKind.embedding,
    "embedding": ExpertKind.embedding,
}

# Civitai ``types`` query values per kind (what the spider asks for).
CIVITAI_TYPES = {"checkpoint": ("Checkpoint",), "lora": ("LORA",), "locon": ("LoCon",),
                 "embedding": ("TextualInversion",)}


def normalize_kind(raw: str | None) -> ExpertKind | None:
    """The expert kind of a source type, ``None`` for types DiffGraph does not use (VAEs, hypernetworks...)."""
    return _KINDS.get(str(raw or "").strip().lower())
