"""Enqueue Celery tasks by name without importing the task code (imports only point downstream).

When no broker is configured (the embedded demo) ``send`` is a no-op that returns ``None``; callers that
need the work done in-process call the task function directly.
"""

from __future__ import annotations

import logging
from functools import lru_cache
from typing import Any

from core.settings import Settings

log = logging.getLogger(__name__)

# Task names, written once: the contract between producers, the task modules and the workers in deploy/.
INGEST = "crawler.ingest"
CALIBRATE_EXPERT = "calibration.calibrate_expert"
SWEEP_UNCALIBRATED = "calibration.sweep_uncalibrated"
RETRAIN_PLANNER = "planner.retrain"
GENERATE = "deploy.generate"
# ... and their queues
TASK_QUEUES = {
    INGEST: "ingest",
    CALIBRATE_EXPERT: "calibrate",
    SWEEP_UNCALIBRATED: "calibrate",
    RETRAIN_PLANNER: "calibrate",
    GENERATE: "generate",
}


@lru_cache(maxsize=4)
def _client(broker_url: str, result_url: str) -> Any:
    from celery import Celery

    app = Celery("diffgraph-client", broker=broker_url, backend=result_url or None)
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        # ride out a broker restart while submitting instead of failing the caller
        task_publish_retry=True,
        task_publish_retry_policy={"max_retries": 10, "interval_start": 0.5, "interval_step": 1.0, "interval_max": 5.0},
        broker_connection_retry_on_startup=True,
    )
    return app


def send(settings: Settings, name: str, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None,
         task_id: str | None = None) -> str | None:
    """Send task ``name`` to its queue; returns the task id, or ``None`` when Celery is not configured."""
    if not settings.celery_enabled:
        log.debug("celery not configured; %s%r not enqueued", name, args)
        return None
    queue = TASK_QUEUES.get(name)
    if queue is None:
        raise ValueError(f"unknown task {name!r}; known: {', '.join(TASK_QUEUES)}")
    result = _client(settings.broker_url, settings.result_url).send_task(
        name, args=list(args), kwargs=kwargs or {}, queue=queue, task_id=task_id
    )
    return str(result.id)
