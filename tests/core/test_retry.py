"""One definition of a transient error and one retry style for every task (``core.retry``), run through a
real (eager) Celery app."""

from __future__ import annotations

import pytest
from celery import Celery

from core.retry import Transient, is_transient, retry_countdown, retry_or_raise
from core.types import NotFoundError
from graphdb import errors


class Flaky(Transient, RuntimeError):
    pass


def _app_with_task(fail_with: list[BaseException]):
    app = Celery("retry-test", broker="memory://", backend="cache+memory://")
    app.conf.task_always_eager = True
    attempts: list[int] = []

    @app.task(bind=True, max_retries=3)
    def job(self):
        attempts.append(self.request.retries)
        try:
            if fail_with:
                raise fail_with.pop(0)
            return "done"
        except Exception as exc:
            retry_or_raise(self, exc, base=0.001, cap=0.002)

    return job, attempts


def test_transient_errors_are_retried_until_they_pass() -> None:
    job, attempts = _app_with_task([Flaky("busy"), errors.GraphBusy("locked")])
    assert job.apply().get() == "done"
    assert attempts == [0, 1, 2]


def test_request_errors_fail_at_once_and_retries_are_bounded() -> None:
    job, attempts = _app_with_task([NotFoundError("unknown expert 'x'")])
    with pytest.raises(NotFoundError):
        job.apply().get()
    assert attempts == [0]
    job, attempts = _app_with_task([ConnectionError("down")] * 10)
    with pytest.raises(ConnectionError):
        job.apply().get()
    assert attempts == [0, 1, 2, 3]  # max_retries=3


def test_what_counts_as_transient() -> None:
    assert is_transient(errors.GraphUnavailable("unreachable")) and is_transient(errors.GraphBusy("locked"))
    assert not is_transient(errors.GraphError("bad input")) and not is_transient(ValueError("bug"))
    lock = RuntimeError("IO exception: Could not set lock on file : /x/graph")
    assert not is_transient(lock) and errors.is_transient(lock)  # only the graph package knows its engine
    import neo4j.exceptions

    assert errors.is_transient(neo4j.exceptions.TransientError("deadlock"))
    assert 1.0 <= retry_countdown(0, base=2.0, cap=60.0) <= 2.0 and retry_countdown(20, 2.0, 60.0) <= 60.0
