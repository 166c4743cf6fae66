"""The Celery app, built from settings: queues, routing, reliability options and the beat schedule.

Workers start with ``diffgraph worker`` (or ``celery -A deploy.celery_app worker``). Task code lives in
each package's ``tasks`` module and is registered with ``@shared_task(name=...)``.
"""

from __future__ import annotations

from datetime import timedelta

from celery import Celery
from kombu import Queue

from core.queue import TASK_QUEUES
from core.settings import Settings, get_settings

TASK_MODULES = ("crawler.tasks", "calibration.tasks", "planner.tasks", "deploy.tasks")
QUEUES = ("ingest", "calibrate", "generate")


def _task_modules() -> list[str]:
    import importlib.util

    return [m for m in TASK_MODULES if importlib.util.find_spec(m) is not None]


def make_app(settings: Settings | None = None) -> Celery:
    settings = settings or get_settings()
    broker = settings.broker_url or "memory://"
    app = Celery("diffgraph", broker=broker, backend=settings.result_url or None, include=_task_modules())
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        task_queues=[Queue(q) for q in QUEUES],
        task_default_queue="ingest",
        task_routes={name: {"queue": q} for name, q in TASK_QUEUES.items()},
        # A task is acknowledged only after it finished, so a killed worker's task is redelivered;
        # tasks are idempotent (keyed writes) so a redelivery never duplicates records or edges.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_track_started=True,
        task_soft_time_limit=3600,
        task_time_limit=3900,
        result_expires=7 * 24 * 3600,
        result_extended=True,
        broker_connection_retry_on_startup=True,
        broker_transport_options={"visibility_timeout": 4 * 3600},
        task_always_eager=not settings.celery_enabled,
        beat_schedule={
            "ingest-civitai": {
                "task": "crawler.ingest",
                "schedule": timedelta(seconds=settings.crawl_interval_s),
                "args": ("civitai",),
            },
            "ingest-huggingface": {
                "task": "crawler.ingest",
                "schedule": timedelta(seconds=settings.crawl_interval_s),
                "args": ("huggingface",),
            },
            "sweep-uncalibrated": {
                "task": "calibration.sweep_uncalibrated",
                "schedule": timedelta(seconds=settings.calib_interval_s),
            },
            "retrain-planner": {
                "task": "planner.retrain",
                "schedule": timedelta(seconds=settings.planner_retrain_interval_s),
            },
        },
    )
    return app


app = make_app()
