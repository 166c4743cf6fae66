"""Versioned VGAE checkpoints: ``<data_dir>/planner/vgae-<version>.pt`` plus a ``PlannerModel`` SQL row.

A checkpoint is a plain dict (``state_dict``, ``config``, ``metrics``, ``version``, ``embedding_model``,
``target``) written with ``torch.save`` and read back with ``torch.load(weights_only=True)`` only.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from sqlalchemy import select

from core.records import PlannerModel, session_scope
from core.settings import Settings
from core.types import DiffGraphError
from planner.vgae import BetaVGAE, VGAEConfig

log = logging.getLogger(__name__)


@dataclass
class PlannerCheckpoint:
    version: str
    path: Path
    config: VGAEConfig
    model: BetaVGAE  # in eval mode
    metrics: dict[str, Any] = field(default_factory=dict)
    embedding_model: str = ""
    target: str = "solo"  # what the Beta head was trained toward: solo capability or merged outcomes


def checkpoint_dir(settings: Settings) -> Path:
    return settings.data_dir / "planner"


def save_checkpoint(
    settings: Settings,
    version: str,
    model: BetaVGAE,
    config: VGAEConfig,
    metrics: dict[str, Any],
    target: str = "solo",
) -> tuple[Path, int]:
    """Write the checkpoint file atomically and register it; returns (path, PlannerModel id).

    ``target`` (``solo`` | ``merged``) is stored in the file and in the row's metrics."""
    metrics = {**metrics, "target": target}
    out = checkpoint_dir(settings) / f"vgae-{version}.pt"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".pt.tmp")
    torch.save(
        {
            "version": version,
            "config": config.to_dict(),
            "metrics": metrics,
            "embedding_model": settings.embedding_model,
            "target": target,
            "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        },
        tmp,
    )
    tmp.replace(out)
    with session_scope(settings) as session:
        parent = session.scalars(select(PlannerModel).order_by(PlannerModel.id.desc()).limit(1)).first()
        row = PlannerModel(
            version=version, path=str(out), metrics=metrics, parent_id=parent.id if parent else None
        )
        session.add(row)
        session.flush()
        row_id = int(row.id)
    return out, row_id


@lru_cache(maxsize=4)
def _load(path: str, mtime_ns: int) -> PlannerCheckpoint:
    blob = torch.load(path, map_location="cpu", weights_only=True)
    try:
        config = VGAEConfig.from_dict(blob["config"])
        model = BetaVGAE.from_config(config)
        model.load_state_dict(blob["state_dict"])
    except (KeyError, TypeError, RuntimeError) as exc:
        raise DiffGraphError(f"planner checkpoint {path} is not a valid VGAE checkpoint: {exc}") from exc
    model.eval()
    return PlannerCheckpoint(
        version=str(blob.get("version", "")),
        path=Path(path),
        config=config,
        model=model,
        metrics=dict(blob.get("metrics") or {}),
        embedding_model=str(blob.get("embedding_model", "")),
        target=str(blob.get("target", "solo")),
    )


def load_checkpoint(path: Path) -> PlannerCheckpoint:
    """Load (cached per file version) a checkpoint written by ``save_checkpoint``."""
    if not path.is_file():
        raise DiffGraphError(f"planner checkpoint {path} does not exist")
    return _load(str(path), path.stat().st_mtime_ns)


def latest_record(settings: Settings, target: str | None = None) -> PlannerModel | None:
    """The newest ``PlannerModel`` row (of ``target`` when given; rows without one are ``solo``)."""
    with session_scope(settings) as session:
        query = select(PlannerModel).order_by(PlannerModel.id.desc())
        for row in session.scalars(query if target is not None else query.limit(1)):
            if target is None or (row.metrics or {}).get("target", "solo") == target:
                session.expunge(row)
                return row
        return None


def latest_checkpoint(settings: Settings, target: str | None = None) -> PlannerCheckpoint | None:
    """The most recently registered checkpoint (of ``target`` when given) whose file still exists, or ``None``."""
    row = latest_record(settings, target)
    if row is None:
        return None
    path = Path(row.path)
    if not path.is_file():
        log.warning("planner model %s is registered but %s is missing", row.version, path)
        return None
    return load_checkpoint(path)
