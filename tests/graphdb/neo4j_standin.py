"""A recording stand-in for the ``neo4j`` driver (no Neo4j server runs in CI).

It records every statement and answers the few the store's lifecycle depends on (server version, stored
embedding size, the vector index and its DDL, expert upserts) from a tiny in-memory state; anything else
returns no rows. Install it with ``standin_server`` (replaces ``graphdb.neo4j.drivers.DRIVER_FACTORY``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from graphdb.neo4j import queries as q


class Record:
    def __init__(self, data: dict[str, Any]) -> None:
        self._data = data

    def data(self) -> dict[str, Any]:
        return dict(self._data)

    def __getitem__(self, key: str) -> Any:
        return self._data[key]


class Result:
    def __init__(self, rows: list[dict[str, Any]]) -> None:
        self.records = [Record(r) for r in rows]

    def consume(self) -> None:
        return None

    def single(self) -> Record | None:
        return self.records[0] if self.records else None

    def __iter__(self):
        return iter(self.records)


@dataclass
class Server:
    version: str = "5.20.0"
    stored_dim: int | None = None
    index_dim: int | None = None
    experts: int = 0
    statements: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    drivers: list[StandInDriver] = field(default_factory=list)
    verifications: int = 0

    def count(self, prefix: str) -> int:
        return sum(1 for query, _ in self.statements if query.startswith(prefix))

    def run(self, query: str, params: dict[str, Any]) -> list[dict[str, Any]]:
        self.statements.append((query, dict(params)))
        if query == q.SERVER_VERSION_QUERY:
            return [{"name": "Neo4j Kernel", "versions": [self.version], "edition": "community"}]
        if query == q.EMBEDDING_DIM_QUERY:
            return [{"dim": self.stored_dim}] if self.stored_dim else []
        if query == q.SHOW_VECTOR_INDEX_QUERY:
            if self.index_dim is None:
                return []
            return [{"name": q.VECTOR_INDEX_NAME, "state": "ONLINE",
                     "options": {"indexConfig": {"vector.dimensions": self.index_dim}}}]
        if query.startswith("CREATE VECTOR INDEX"):
            if self.index_dim is None:  # IF NOT EXISTS: an index of another size would stay as it is
                self.index_dim = int(re.search(r"`vector.dimensions`: (\d+)", query).group(1))
            return []
        if query == q.DROP_VECTOR_INDEX_QUERY:
            self.index_dim = None
            return []
        if query == q.COUNT_EMBEDDED_EXPERTS_QUERY:
            return [{"n": self.experts}]
        for row in params.get("rows", []) if isinstance(params.get("rows"), list) else []:
            embedding = (row.get("props") or {}).get("embedding") if isinstance(row, dict) else None
            if embedding:
                self.stored_dim = len(embedding)
                self.experts += 1
        return []


class Session:
    def __init__(self, server: Server) -> None:
        self.server = server

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def run(self, query: str, params: dict[str, Any] | None = None, **kwparams: Any) -> Result:
        # the driver's ``run(query, parameters=None, **kwparameters)``
        return Result(self.server.run(query, {**(params or {}), **kwparams}))

    def execute_write(self, work: Any) -> Any:
        return work(self)


class StandInDriver:
    def __init__(self, server: Server, uri: str, **kwargs: Any) -> None:
        self.server, self.uri, self.kwargs = server, uri, kwargs
        self.closed = False

    def verify_connectivity(self) -> None:
        self.server.verifications += 1

    def execute_query(self, query: str, params: dict[str, Any] | None = None, **_: Any) -> tuple[list, None, None]:
        return Result(self.server.run(query, params or {})).records, None, None

    def session(self, **_: Any) -> Session:
        return Session(self.server)

    def close(self) -> None:
        self.closed = True
