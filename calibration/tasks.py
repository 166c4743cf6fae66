"""Celery tasks of the ``calibrate`` queue (GPU workers): calibrate one expert; sweep uncalibrated experts.

``calibrate_expert`` is idempotent (CAPABILITY edges are keyed by (expert, prompt), run rows are per attempt),
so ``acks_late`` redelivery after a worker crash only repeats the work. Only transient errors (graph busy or
unreachable, network) are retried with backoff; a bad expert is a recorded failure, not an exception.
"""

from __future__ import annotations

import logging
from typing import Any

from billiard.exceptions import TimeLimitExceeded
from celery import Task, shared_task

from core.queue import CALIBRATE_EXPERT, SWEEP_UNCALIBRATED
from core.retry import Transient, retry_or_raise
from core.settings import get_settings

log = logging.getLogger(__name__)

SOFT_TIME_LIMIT_S = 2 * 3600  # a full reference set at 512 px / 20 steps fits comfortably on one GPU
TIME_LIMIT_S = SOFT_TIME_LIMIT_S + 300


class TransientCalibrationError(Transient, RuntimeError):
    """The expert could not be calibrated for a reason a later attempt may not have."""


# graph busy/unreachable, broker/network hiccups are retried (core.retry); everything else is the expert's
# own fault
RETRY_BASE_S = 10.0
RETRY_CAP_S = 600.0


class CalibrateTask(Task):
    def on_failure(self, exc: BaseException, task_id: str, args: Any, kwargs: Any, einfo: Any) -> None:
        """A hard time limit kills the pool process mid-run: Celery calls this in the worker's main process,
        which closes the task's still-running run rows as failed."""
        if isinstance(exc, TimeLimitExceeded):
            from calibration.calibrate import fail_running_runs

            fail_running_runs(get_settings(), task_id, f"time limit exceeded ({exc})")


@shared_task(name=CALIBRATE_EXPERT, bind=True, acks_late=True, max_retries=3, base=CalibrateTask,
             soft_time_limit=SOFT_TIME_LIMIT_S, time_limit=TIME_LIMIT_S)
def calibrate_expert(self: Any, expert_id: str, n_prompts: int | None = None,
                     n_seeds: int | None = None) -> dict[str, Any]:
    """Calibrate ``expert_id``; returns the outcome as JSON. Transient failures are retried with backoff."""
    from calibration.calibrate import calibrate_experts

    try:
        (outcome,) = calibrate_experts(get_settings(), [expert_id], n_prompts=n_prompts, n_seeds=n_seeds,
                                       task_id=self.request.id)
        if outcome.transient:
            raise TransientCalibrationError(outcome.error or "transient failure")
    except Exception as exc:
        retry_or_raise(self, exc, base=RETRY_BASE_S, cap=RETRY_CAP_S)
    return outcome.to_json()


@shared_task(name=SWEEP_UNCALIBRATED, bind=True, acks_late=True, max_retries=3)
def sweep_uncalibrated(self: Any, limit: int = 1000) -> dict[str, Any]:
    """Find experts not calibrated for the current reference set; enqueue each (or calibrate in-process)."""
    try:
        return sweep(get_settings(), limit=limit)
    except Exception as exc:
        retry_or_raise(self, exc, base=RETRY_BASE_S, cap=RETRY_CAP_S)


def sweep(settings: Any, limit: int = 1000) -> dict[str, Any]:
    """The sweep itself: ``{"ref_set_version", "found", "enqueued", "task_ids", "calibrated", "given_up"}``.

    ``given_up`` lists the uncalibrated experts no longer queued because they failed on their own
    ``DIFFGRAPH_CALIB_MAX_ATTEMPTS`` times: ``[{"expert_id", "failures", "last_error"}]``."""
    from calibration.calibrate import pending_experts
    from calibration.refset import load_reference_set
    from core.queue import send

    version = load_reference_set().version
    ids, skipped = pending_experts(settings, limit)
    result: dict[str, Any] = {"ref_set_version": version, "found": len(ids), "enqueued": 0, "task_ids": [],
                              "calibrated": [],
                              "given_up": [{"expert_id": eid, **info} for eid, info in sorted(skipped.items())]}
    if skipped:
        log.warning("calibration sweep: %d expert(s) given up after repeated failures of their own: %s",
                    len(skipped), ", ".join(sorted(skipped)))
    if not ids:
        return result
    if settings.celery_enabled:
        result["task_ids"] = [send(settings, CALIBRATE_EXPERT, (eid,)) for eid in ids]
        result["enqueued"] = len(ids)
    else:
        from calibration.calibrate import calibrate_experts

        result["calibrated"] = [o.to_json() for o in calibrate_experts(settings, ids)]
    return result
