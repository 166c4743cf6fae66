"""The one module that talks to the embedded graph engine (LadybugDB, a Kùzu fork with the same API).

Swapping to ``kuzu`` means changing the import below: the rest of the embedded backend only uses
``Engine``. The engine admits one *process* at a time (a file lock); inside a process we share one
``Database`` per path between stores (reference counted) so nested sessions do not fight over it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import real_ladybug as _engine

from graphdb.errors import ENGINE_LOCK_MARKERS, GraphBusy, GraphError, GraphUnavailable, is_engine_lock_error

# Seen while another process is closing/checkpointing the same database (two Celery workers taking
# turns): the files are mid-rewrite, so wait like for the lock instead of failing at once.
_IN_FLUX_MARKERS = ("shadow file", "no corresponding database file", "reading past the end")
# statements that are never cached as prepared statements (schema, transactions, bulk input)
_UNPREPARED = ("CREATE", "BEGIN", "COMMIT", "ROLLBACK", "COPY", "LOAD", "DROP", "ALTER")
_MAX_PREPARED = 256
# a checkpoint rewrites whole (uncompressed) column chunks: at 100k experts one costs seconds, so let the
# write-ahead log grow to 256 MiB between checkpoints instead of checkpointing after most bulk writes
CHECKPOINT_BYTES = 256 * 1024 * 1024


@dataclass
class _Shared:
    database: Any
    refs: int = 0


_registry: dict[str, _Shared] = {}
_registry_lock = threading.Lock()


def _open_database(path: Path, timeout_s: float) -> Any:
    """Open the database file, retrying with bounded backoff while another process holds its lock."""
    deadline = time.monotonic() + timeout_s
    delay = 0.05
    while True:
        try:
            # compression=False: with compression on, 0.15.3 corrupts FLOAT[] values (some become 0.0)
            # when COPY appends to a non-empty table (measured; see the graph-embedded report)
            return _engine.Database(str(path), compression=False, checkpoint_threshold=CHECKPOINT_BYTES)
        except RuntimeError as exc:
            message = str(exc)
            if not any(m in message.lower() for m in (*ENGINE_LOCK_MARKERS, *_IN_FLUX_MARKERS)):
                raise GraphUnavailable(f"cannot open the embedded graph at {path}: {message}") from exc
            if time.monotonic() >= deadline:
                raise GraphBusy(
                    f"the embedded graph at {path} is locked by another process (waited {timeout_s:.0f} s); "
                    "the embedded backend admits one process at a time — stop the other process or use Neo4j"
                ) from exc
            time.sleep(delay)
            delay = min(delay * 2, 1.0)


class Engine:
    """A connection to one embedded database, with parameterised execution and arrow I/O."""

    def __init__(self, path: str | Path, lock_timeout_s: float = 30.0) -> None:
        target = Path(path).expanduser()
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise GraphUnavailable(f"cannot create the graph directory {target.parent}: {exc}") from exc
        self.path = str(target.resolve())
        with _registry_lock:
            shared = _registry.get(self.path)
            if shared is None:
                shared = _Shared(_open_database(target, lock_timeout_s))
                _registry[self.path] = shared
            shared.refs += 1
        self._shared: _Shared | None = shared
        self._conn = _engine.Connection(shared.database)
        self._in_tx = False
        # parsing + planning costs ~0.5 ms per statement, a cached primary-key lookup ~0.1 ms; plans
        # depend on table statistics, so the cache is dropped after every write transaction
        self._prepared: dict[str, Any] = {}

    # lifecycle ---------------------------------------------------------------------------------
    def close(self) -> None:
        shared, self._shared = self._shared, None
        if shared is None:
            return
        self._prepared.clear()
        try:
            self._conn.close()
        finally:
            with _registry_lock:
                shared.refs -= 1
                if shared.refs <= 0:
                    _registry.pop(self.path, None)
                    shared.database.close()

    @property
    def closed(self) -> bool:
        return self._shared is None

    def _live(self) -> _Shared:
        if self._shared is None:
            raise GraphError("the graph store is closed")
        return self._shared

    # execution ---------------------------------------------------------------------------------
    def _statement(self, query: str) -> Any:
        if query.lstrip().split(" ", 1)[0].upper() in _UNPREPARED:
            return query
        statement = self._prepared.get(query)
        if statement is None:
            statement = _engine.PreparedStatement(self._conn, query)
            if not statement.is_success():
                raise GraphError(f"embedded graph query failed: {statement.get_error_message()}")
            if len(self._prepared) >= _MAX_PREPARED:
                self._prepared.clear()
            self._prepared[query] = statement
        return statement

    def _run(self, query: str, params: Mapping[str, Any] | None) -> Any:
        self._live()
        try:
            return self._conn.execute(self._statement(query), dict(params or {}))
        except RuntimeError as exc:
            if is_engine_lock_error(exc):
                raise GraphBusy(
                    f"the embedded graph at {self.path} is locked by another process: {exc}"
                ) from exc
            raise GraphError(f"embedded graph query failed: {exc}") from exc

    def execute(self, query: str, params: Mapping[str, Any] | None = None) -> list[list[Any]]:
        """Run one statement (always with parameters for values) and return its rows."""
        result = self._run(query, params)
        try:
            return result.get_all() if result.has_next() else []
        finally:
            result.close()

    def arrow(self, query: str, params: Mapping[str, Any] | None = None) -> pa.Table:
        """Run a query and return its result as one arrow table (bulk reads: no per-row Python objects)."""
        result = self._run(query, params)
        try:
            return result.get_as_arrow()
        finally:
            result.close()

    def load(self, query: str, table: pa.Table, params: Mapping[str, Any] | None = None) -> None:
        """Run ``LOAD FROM $rows ...`` or ``COPY <table> FROM $rows`` (bulk append) over a typed arrow table
        (batched writes with exact column types)."""
        if table.num_rows:
            self._run(query, {**(params or {}), "rows": table}).close()

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """One write transaction; nested use joins the outer one. Rolls back on any error."""
        if self._in_tx:
            yield
            return
        self._run("BEGIN TRANSACTION", None).close()
        self._in_tx = True
        try:
            yield
        except BaseException:
            self._in_tx = False
            try:
                self._run("ROLLBACK", None).close()
            except GraphError:
                pass
            raise
        else:
            self._in_tx = False
            self._run("COMMIT", None).close()
        finally:
            self._prepared.clear()
