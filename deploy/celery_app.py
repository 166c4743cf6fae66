"""The Celery app, built from settings: queues, routing, reliability options, retry policy and beat.

Workers start with ``diffgraph worker`` (or ``celery -A deploy.celery_app worker``). Task code lives in
each package's ``tasks`` module and is registered with ``@shared_task(name=...)``.

Delivery guarantees (what makes "no task is lost, no task is recorded twice" hold):

* ``task_acks_late`` + ``task_reject_on_worker_lost``: a message is acknowledged only after its task
  returned. A worker killed mid-task (SIGKILL, OOM, machine lost) never acknowledges it, so the broker
  redelivers it. Tasks are therefore idempotent: generation records and ``:Generation`` nodes are keyed
  by the task id, and a redelivered task that finds a finished record returns it without redoing work.
* ``worker_prefetch_multiplier=1``: a worker reserves one message per process, so a dead worker strands
  at most the task it was running (and GPU tasks are not hoarded by one machine).
* Redis transport ``visibility_timeout`` (``broker_transport_options``): an unacknowledged message is
  put back on its queue once it has been reserved this long; it must exceed the longest task (the hard
  time limit), otherwise a healthy long task would be redelivered while still running. Override it with
  ``DIFFGRAPH_VISIBILITY_TIMEOUT_S`` (tests use a few seconds to observe the redelivery of a killed
  worker's task). ``unacked_restore_interval``/``unacked_restore_throttle`` decide how often workers
  sweep for such messages.
* ``worker_cancel_long_running_tasks_on_connection_loss=False``: when the broker connection drops, a
  running late-ack task's message may be redelivered while it still runs. Generation jobs hold a lease
  (``deploy.lease``): the second delivery waits for the first and returns its result, so the running
  task is kept rather than cancelled (calibration runs are idempotent keyed writes and only repeat work).
* Time limits: workers run the prefork pool (``diffgraph worker`` always does), the only pool in which
  Celery enforces ``time_limit``/``soft_time_limit`` (solo and threads ignore them). Prefork arms only
  the soft timer when a task has one, and the app-wide soft limit counts as one, so a task whose own hard
  limit is shorter would run until the app-wide soft limit; ``enforce_task_time_limits`` gives such tasks
  a soft limit just below their hard limit when the worker starts. A hard kill calls the task's
  ``on_failure`` in the worker's main process, where generation and calibration record the failure.
* Publishing retries (``task_publish_retry``) and unlimited broker reconnects
  (``broker_connection_max_retries=None``) ride out a broker restart on both sides.
* **The broker itself must be persistent.** Queued and unacknowledged messages live in Redis keys; a
  Redis without persistence loses them on restart. Run Redis with AOF: ``--appendonly yes
  --appendfsync always`` (or ``everysec``, trading at most one second of accepted messages for speed).
  ``deploy/compose.yaml`` does this; the tests restart an AOF Redis and check no task is lost.

Retries: only transient errors are retried (``core.retry``, graph-aware through ``graphdb.errors.is_transient``:
graph busy/unavailable, broker, result backend and SQL connection errors), with capped exponential backoff and
jitter (``retry_countdown``); user errors (``DiffGraphError``: bad input, unknown expert, corrupt or
incompatible weights) fail at once.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from celery import Celery, signals
from kombu import Queue

from core.queue import INGEST, RETRAIN_PLANNER, SWEEP_UNCALIBRATED, TASK_QUEUES
from core.retry import MAX_RETRIES, RETRY_BASE_S, RETRY_CAP_S, retry_countdown  # noqa: F401 - re-exported
from core.settings import Settings, get_settings
from graphdb.errors import is_transient  # noqa: F401 - re-exported: the one definition, graph-aware

TASK_MODULES = ("crawler.tasks", "calibration.tasks", "planner.tasks", "deploy.tasks")
QUEUES = ("ingest", "calibrate", "generate")

DEFAULT_VISIBILITY_TIMEOUT_S: int = Settings.model_fields["visibility_timeout_s"].default
SOFT_TIME_LIMIT_S = 3600
HARD_TIME_LIMIT_S = 3900


def _task_modules() -> list[str]:
    import importlib.util

    return [m for m in TASK_MODULES if importlib.util.find_spec(m) is not None]


def visibility_timeout_s(settings: Settings) -> int:
    """The broker's visibility timeout (``DIFFGRAPH_VISIBILITY_TIMEOUT_S``, default 4 hours)."""
    return settings.visibility_timeout_s


def broker_transport_options(settings: Settings) -> dict[str, Any]:
    """Redis transport options: redelivery of unacknowledged messages and robust connections."""
    vt = visibility_timeout_s(settings)
    # Sweep for expired reservations often enough that a short timeout is honoured promptly.
    restore_every = max(1, min(10, vt // 5))
    return {
        "visibility_timeout": vt,
        "unacked_restore_interval": restore_every,
        "unacked_restore_throttle": 1 if vt < 600 else 10,
        "socket_keepalive": True,
        "socket_connect_timeout": 5,
        "health_check_interval": 10,
    }


def soft_limit_for(hard_s: float) -> float:
    """The soft limit given to a task whose hard limit is below the app-wide soft limit: a little earlier
    than the hard kill, so the task's own failure handling (records, cleanup) can run."""
    return max(hard_s * 0.8, hard_s - 30.0)


def enforce_task_time_limits(app: Celery) -> list[str]:
    """Give every task whose ``time_limit`` is below the app-wide soft limit a soft limit under it (see the
    module docstring); returns the names of the tasks changed."""
    app_soft = app.conf.task_soft_time_limit
    changed = []
    for name, task in app.tasks.items():
        hard = getattr(task, "time_limit", None)
        soft = getattr(task, "soft_time_limit", None)
        if not hard or (soft is None and (app_soft is None or app_soft < hard)) or (soft is not None and soft < hard):
            continue
        task.soft_time_limit = soft_limit_for(hard)
        changed.append(name)
    return changed


# this process's worker node name (``name@host``), set when a worker starts; tasks' ``on_failure`` hooks run
# in the worker's main process, where the task's own request (and its hostname) is not available
worker_node: dict[str, str] = {}


@signals.worker_init.connect
def _on_worker_init(sender: Any = None, **_: Any) -> None:
    app = getattr(sender, "app", None)
    if app is not None:
        enforce_task_time_limits(app)
    if getattr(sender, "hostname", None):
        worker_node["hostname"] = sender.hostname


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
        worker_cancel_long_running_tasks_on_connection_loss=False,  # leases make a second delivery wait
        task_track_started=True,
        task_soft_time_limit=SOFT_TIME_LIMIT_S,
        task_time_limit=HARD_TIME_LIMIT_S,
        result_expires=7 * 24 * 3600,
        result_extended=True,
        broker_connection_retry_on_startup=True,
        broker_connection_retry=True,
        broker_connection_max_retries=None,
        task_publish_retry=True,
        task_publish_retry_policy={"max_retries": 20, "interval_start": 0.2, "interval_step": 0.5,
                                   "interval_max": 3.0},
        broker_transport_options=broker_transport_options(settings),
        result_backend_transport_options={"retry_policy": {"max_retries": 20, "interval_start": 0.2,
                                                           "interval_step": 0.5, "interval_max": 3.0}},
        task_always_eager=not settings.celery_enabled,
        beat_schedule={
            # a crawl not started within one interval is dropped: the next beat's crawl replaces it
            "ingest-civitai": {
                "task": INGEST,
                "schedule": timedelta(seconds=settings.crawl_interval_s),
                "args": ("civitai",),
                "options": {"expires": settings.crawl_interval_s},
            },
            "ingest-huggingface": {
                "task": INGEST,
                "schedule": timedelta(seconds=settings.crawl_interval_s),
                "args": ("huggingface",),
                "options": {"expires": settings.crawl_interval_s},
            },
            "sweep-uncalibrated": {
                "task": SWEEP_UNCALIBRATED,
                "schedule": timedelta(seconds=settings.calib_interval_s),
            },
            "retrain-planner": {
                "task": RETRAIN_PLANNER,
                "schedule": timedelta(seconds=settings.planner_retrain_interval_s),
            },
        },
    )
    return app


app = make_app()
