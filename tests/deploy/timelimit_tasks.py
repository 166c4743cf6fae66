"""Test-only Celery tasks with short time limits, registered in a real worker through ``sitecustomize``."""

from __future__ import annotations

import time
from typing import Any

from billiard.exceptions import SoftTimeLimitExceeded
from celery import shared_task

from deploy.tasks import GenerateTask


@shared_task(name="tests.sleep_past_limit", time_limit=2)
def sleep_past_limit(seconds: float = 8.0) -> str:
    time.sleep(seconds)
    return "finished"


@shared_task(name="tests.hang_past_hard_limit", bind=True, time_limit=2, base=GenerateTask)
def hang_past_hard_limit(self: Any, seconds: float = 8.0) -> str:
    """Ignores the soft limit, so only the hard kill stops it (as a job stuck in native code would)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            time.sleep(0.1)
        except SoftTimeLimitExceeded:
            continue
    return "finished"
