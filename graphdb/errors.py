"""The graph package's own errors: callers (workers, CLI) branch on these, never on a backend's exceptions.

``GraphUnavailable`` means "try again later" (unreachable, locked, busy); every other ``GraphError`` is a
problem of the request itself.
"""

from __future__ import annotations

from core.types import DiffGraphError


class GraphError(DiffGraphError):
    """A graph operation failed (bad input or backend error)."""


class GraphUnavailable(GraphError):
    """The backend cannot be reached or opened."""


class GraphBusy(GraphUnavailable):
    """The backend is reachable but busy: the embedded database is held by another process, or Neo4j
    reported a transient error (deadlock, leader switch) that outlived the driver's own retries."""
