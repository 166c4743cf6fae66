"""One Neo4j driver per process and credentials, and per-database facts learnt once.

A ``neo4j.Driver`` is a thread-safe connection pool meant to live as long as the process; opening one per
store session (with ``verify_connectivity``, the server-version query and the schema DDL plus
``awaitIndexes``) cost several round trips 2–3 times per generation. ``shared_driver`` keeps one driver per
(process, URL, user, password) — a forked child opens its own, since drivers are not fork-safe — and
``DatabaseState`` records what a process has learnt about one database: server version, whether the
schema was ensured, the vector index's dimension.

``DRIVER_FACTORY`` is ``neo4j.GraphDatabase.driver``; tests without a server replace it with a stand-in.
"""

from __future__ import annotations

import atexit
import hashlib
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


def _neo4j_driver(uri: str, **kwargs: Any) -> Any:
    import neo4j

    return neo4j.GraphDatabase.driver(uri, **kwargs)


DRIVER_FACTORY: Callable[..., Any] = _neo4j_driver


@dataclass
class DatabaseState:
    """What this process knows about one database behind one driver."""

    version: tuple[int, ...] | None = None
    schema_ready: bool = False
    index_dim: int | None = None  # the vector index's dimension once known (0: none, brute force)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)


@dataclass
class SharedDriver:
    driver: Any
    verified: bool = False
    databases: dict[str, DatabaseState] = field(default_factory=dict)

    def database(self, name: str) -> DatabaseState:
        with _lock:
            return self.databases.setdefault(name, DatabaseState())


_lock = threading.RLock()
_drivers: dict[tuple[int, str, str, str], SharedDriver] = {}


def _key(uri: str, user: str, password: str) -> tuple[int, str, str, str]:
    # the password is part of the identity (a changed one needs a new driver) but is not kept as such
    return os.getpid(), uri, user, hashlib.sha256(password.encode()).hexdigest()


def shared_driver(uri: str, user: str, password: str, **kwargs: Any) -> SharedDriver:
    """The process's driver for ``uri`` and these credentials, created on first use (``kwargs`` go to
    the factory then)."""
    key = _key(uri, user, password)
    with _lock:
        entry = _drivers.get(key)
        if entry is None:
            entry = SharedDriver(DRIVER_FACTORY(uri, auth=(user, password), **kwargs))
            _drivers[key] = entry
        return entry


def discard(uri: str, user: str, password: str) -> None:
    """Close and forget the driver (after it failed to connect, so the next session starts afresh)."""
    with _lock:
        entry = _drivers.pop(_key(uri, user, password), None)
    if entry is not None:
        entry.driver.close()


@atexit.register
def close_all() -> None:
    """Close this process's drivers (at exit, or in tests)."""
    with _lock:
        mine = [k for k in _drivers if k[0] == os.getpid()]
        entries = [_drivers.pop(k) for k in mine]
    for entry in entries:
        try:
            entry.driver.close()
        except Exception:  # closing at exit must not raise
            pass
