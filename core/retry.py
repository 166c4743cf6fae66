"""What a transient error is, and the one way the Celery tasks retry it.

A transient error is one a later attempt may not have: a service busy or unreachable (the graph, the
broker, the result backend, SQL), a network hiccup. Errors of the request itself (``DiffGraphError``:
bad input, unknown expert, corrupt weights) are not: retrying cannot fix them. Our own transient errors
say so by subclassing ``Transient``; the graph package adds what its backends raise
(``graphdb.errors.is_transient``).

Every task retries the same way (``retry_or_raise``): while it has retries left, a transient error is
retried after a capped exponential backoff with full jitter; anything else fails at once. Tasks differ
only in the backoff base and cap (a crawl waits minutes, a generation seconds).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from functools import lru_cache
from typing import Any, NoReturn

from core.types import DiffGraphError

log = logging.getLogger(__name__)

MAX_RETRIES = 5
RETRY_BASE_S = 2.0
RETRY_CAP_S = 120.0


class Transient(Exception):  # noqa: N818 - a marker mixed into error classes, not raised itself
    """Mixed into an error class whose failures a later attempt may not have."""


@lru_cache(maxsize=1)
def _library_transients() -> tuple[type[BaseException], ...]:
    """Connection-level errors of the broker, result backend and SQL clients (those installed)."""
    found: list[type[BaseException]] = []
    try:
        from kombu.exceptions import OperationalError as KombuOperationalError

        found.append(KombuOperationalError)
    except ImportError:  # pragma: no cover - kombu ships with celery
        pass
    try:
        import redis.exceptions as redis_exc

        found += [redis_exc.ConnectionError, redis_exc.TimeoutError, redis_exc.BusyLoadingError]
    except ImportError:  # pragma: no cover
        pass
    try:
        import sqlalchemy.exc as sa_exc

        found += [sa_exc.OperationalError, sa_exc.InterfaceError, sa_exc.DisconnectionError]
    except ImportError:  # pragma: no cover
        pass
    return tuple(found)


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` is worth retrying (see the module docstring)."""
    if isinstance(exc, Transient):
        return True
    if isinstance(exc, DiffGraphError):
        return False
    if isinstance(exc, ConnectionError | TimeoutError):
        return True
    return isinstance(exc, _library_transients())


def retry_countdown(retries: int, base: float = RETRY_BASE_S, cap: float = RETRY_CAP_S) -> float:
    """Seconds before retry number ``retries + 1``: capped exponential backoff with full jitter."""
    ceiling = min(cap, base * (2 ** max(0, retries)))
    return random.uniform(ceiling / 2, ceiling)


def retry_or_raise(
    task: Any,
    exc: BaseException,
    *,
    base: float = RETRY_BASE_S,
    cap: float = RETRY_CAP_S,
    transient: Callable[[BaseException], bool] = is_transient,
) -> NoReturn:
    """Inside a bound Celery task's ``except``: retry after ``retry_countdown`` when ``exc`` is transient
    and the task has retries left, else re-raise ``exc``."""
    retries = task.request.retries
    if transient(exc) and retries < task.max_retries:
        countdown = retry_countdown(retries, base, cap)
        log.warning("%s %s: transient error (%s); retry %d in %.1fs", task.name, task.request.id, exc,
                    retries + 1, countdown)  # fmt: skip
        raise task.retry(exc=exc, countdown=countdown) from exc
    raise exc
