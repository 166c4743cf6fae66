"""Celery task ``deploy.generate``: one generation job per task id, reported through task state."""

from __future__ import annotations

import logging
from typing import Any

from billiard.exceptions import TimeLimitExceeded
from celery import Task, shared_task, signals
from celery.exceptions import Ignore

from core.queue import GENERATE
from core.retry import MAX_RETRIES, retry_or_raise
from core.settings import get_settings
from deploy.lease import LeaseLost
from graphdb.errors import is_transient

log = logging.getLogger(__name__)


class GenerateTask(Task):
    def on_failure(self, exc: BaseException, task_id: str, args: Any, kwargs: Any, einfo: Any) -> None:
        """A hard time limit kills the pool process: Celery then calls this in the worker's main process,
        the only place left to record the job as failed (other failures were recorded by the task)."""
        if isinstance(exc, TimeLimitExceeded):
            from deploy.celery_app import worker_node
            from deploy.generation import record_killed

            record_killed(get_settings(), task_id, worker_node.get("hostname"), f"time limit exceeded ({exc})")


@shared_task(name=GENERATE, bind=True, acks_late=True, reject_on_worker_lost=True,
             max_retries=MAX_RETRIES, track_started=True, base=GenerateTask)
def generate(self: Any, prompt: str, options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Plan, merge, sample and record one generation; idempotent on the task id.

    Progress is published as state ``PROGRESS`` with ``meta={"stage", "step", "total"}``. Transient
    failures (graph busy, broker/SQL connection errors) are retried with backoff; anything else (bad
    input, unknown expert, corrupt weights) fails at once with its message.
    """
    from deploy.generation import run_generation

    def progress(stage: str, step: int, total: int) -> None:
        self.update_state(state="PROGRESS", meta={"stage": stage, "step": step, "total": total})

    try:
        return run_generation(get_settings(), self.request.id, prompt, options or {}, progress,
                              worker=self.request.hostname)
    except LeaseLost as exc:
        # Another delivery took the job over and will publish its result: this one leaves no state.
        log.warning("%s", exc)
        raise Ignore() from exc
    except Exception as exc:
        retry_or_raise(self, exc, transient=is_transient)


@signals.celeryd_after_setup.connect
def _preload_generation(sender: Any = None, instance: Any = None, **_: Any) -> None:
    """Import torch/diffusers before a ``generate`` worker takes its first task, not inside it: the
    broker's visibility timeout starts when a task is reserved, and a slow first import eats into it."""
    queues = getattr(getattr(getattr(instance, "app", None), "amqp", None), "queues", None)
    consuming = set(getattr(queues, "consume_from", None) or {}) if queues is not None else set()
    if "generate" not in consuming:
        return
    try:
        import merger.generate  # noqa: F401
    except ImportError:
        log.warning("merger.generate is not importable; generation tasks will fail", exc_info=True)
