"""A circuit breaker: after ``threshold`` failures in a row a service is skipped for ``reset_s`` seconds.

A crawl must not wait on a service that is down: an unreachable LLM endpoint costs its timeout on every
expert, a down broker about 5 s of publish retries per expert. The callers have fallbacks (offline skill
descriptions; the calibration sweep enqueues experts that were missed), so skipping is always safe.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)


class CircuitBreaker:
    """Thread-safe. ``allow()`` is false while open; after ``reset_s`` one call is let through again (a
    failure re-opens at once, a success closes)."""

    def __init__(self, name: str, threshold: int = 3, reset_s: float = 60.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.name, self.threshold, self.reset_s, self.clock = name, threshold, reset_s, clock
        self._failures = 0
        self._open_until = 0.0
        self._lock = threading.Lock()

    @property
    def is_open(self) -> bool:
        return self.clock() < self._open_until

    def allow(self) -> bool:
        return not self.is_open

    def success(self) -> None:
        with self._lock:
            self._failures = 0

    def failure(self, error: object = None) -> None:
        with self._lock:
            self._failures += 1
            if self._failures < self.threshold:
                return
            self._failures = self.threshold - 1  # after the pause, a single failure re-opens
            self._open_until = self.clock() + self.reset_s
        log.warning("%s unavailable (%s); skipping it for %.0fs", self.name, error, self.reset_s)


_breakers: dict[tuple[str, str], CircuitBreaker] = {}
_breakers_lock = threading.Lock()


def breaker_for(kind: str, target: str, threshold: int, reset_s: float = 60.0) -> CircuitBreaker:
    """The process-wide breaker of one service (``kind``, e.g. ``llm``) at ``target`` (its URL)."""
    with _breakers_lock:
        key = (kind, target)
        if key not in _breakers:
            _breakers[key] = CircuitBreaker(f"{kind} at {target.split('@')[-1]}", threshold, reset_s)
        return _breakers[key]
