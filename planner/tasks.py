"""Celery task of the planner: retrain the VGAE on the calibrated graph (``calibrate`` queue).

Idempotent: the task fingerprints the training data first and returns the latest model unchanged when it
was trained on the same data with the same seed (``force=True`` retrains anyway).
"""

from __future__ import annotations

import logging
from typing import Any

from celery import shared_task

from core.queue import RETRAIN_PLANNER
from core.retry import retry_or_raise
from core.settings import get_settings

log = logging.getLogger(__name__)


@shared_task(
    name=RETRAIN_PLANNER,
    bind=True,
    acks_late=True,
    max_retries=3,
)
def retrain(self: Any, epochs: int = 200, seed: int = 0, force: bool = False) -> dict[str, Any]:
    """Train a new planner model unless the latest one already covers the current calibrated graph."""
    try:
        return retrain_if_changed(get_settings(), epochs=epochs, seed=seed, force=force)
    except Exception as exc:
        retry_or_raise(self, exc, base=10.0, cap=600.0)


def retrain_if_changed(
    settings: Any, epochs: int = 200, seed: int = 0, force: bool = False
) -> dict[str, Any]:
    """``{"trained": bool, "version", "path", "metrics"}``; skips training when the data is unchanged."""
    from planner.graph import to_tensors
    from planner.train import fingerprint, load_training_graph, train_planner
    from planner.vgae_checkpoints import latest_record

    if not force:
        latest = latest_record(settings)
        if latest is not None and latest.metrics:
            current = fingerprint(to_tensors(load_training_graph(settings)))
            same = latest.metrics.get("data_fingerprint") == current and latest.metrics.get("seed") == seed
            if same and latest.metrics.get("epochs") == epochs:
                log.info("planner model %s is up to date (data %s)", latest.version, current)
                return {
                    "trained": False,
                    "version": latest.version,
                    "path": latest.path,
                    "metrics": latest.metrics,
                }
    result = train_planner(settings, epochs=epochs, seed=seed)
    return {"trained": True, **result.to_dict()}
