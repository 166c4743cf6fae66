"""The graph package's own errors: callers (workers, CLI) branch on these, never on a backend's exceptions
or messages.

``GraphUnavailable`` (and ``GraphBusy``) mean "try again later" and are ``core.retry.Transient``; every
other ``GraphError`` is a problem of the request itself.
"""

from __future__ import annotations

from core.retry import Transient
from core.retry import is_transient as _is_transient
from core.types import DiffGraphError

# How the embedded engine says another process holds the database file (it raises a bare RuntimeError).
ENGINE_LOCK_MARKERS = ("could not set lock", "lock on file")


class GraphError(DiffGraphError):
    """A graph operation failed (bad input or backend error)."""


class GraphUnavailable(GraphError, Transient):
    """The backend cannot be reached or opened."""


class GraphBusy(GraphUnavailable):
    """The backend is reachable but busy: the embedded database is held by another process, or Neo4j
    reported a transient error (deadlock, leader switch) that outlived the driver's own retries."""


def is_engine_lock_error(exc: BaseException) -> bool:
    return isinstance(exc, RuntimeError) and any(m in str(exc).lower() for m in ENGINE_LOCK_MARKERS)


def is_transient(exc: BaseException) -> bool:
    """``core.retry.is_transient``, plus the backends' own transient exceptions should one escape a store
    unconverted (the embedded engine's lock error, the Neo4j driver's connection and transient errors)."""
    if _is_transient(exc) or is_engine_lock_error(exc):
        return True
    try:
        import neo4j.exceptions as neo_exc
    except ImportError:  # pragma: no cover - the driver is a dependency
        return False
    return isinstance(exc, neo_exc.ServiceUnavailable | neo_exc.SessionExpired | neo_exc.TransientError)
