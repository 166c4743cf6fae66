"""Neo4j sessions share one driver per process and credentials, run the schema once per database, and
size the vector index from the embeddings (with a recording stand-in driver: no server in CI)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from core.settings import Settings
from graphdb.neo4j import drivers
from graphdb.neo4j import queries as q
from graphdb.store import store_session
from tests.graphdb.conftest import make_expert, unit
from tests.graphdb.neo4j_standin import Server, StandInDriver


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> Iterator[Server]:
    srv = Server()

    def factory(uri: str, **kwargs):
        driver = StandInDriver(srv, uri, **kwargs)
        srv.drivers.append(driver)
        return driver

    drivers.close_all()
    monkeypatch.setattr(drivers, "DRIVER_FACTORY", factory)
    yield srv
    drivers.close_all()


def _settings(tmp_path: Path, password: str = "secret") -> Settings:
    return Settings(data_dir=tmp_path, graph_url="neo4j://graph.example:7687", neo4j_password=password)


def test_sessions_share_one_driver_and_run_the_schema_once(server: Server, tmp_path: Path) -> None:
    for _ in range(3):  # a generation opens 2-3 sessions
        with store_session(_settings(tmp_path)) as store:
            store.stats()
    assert len(server.drivers) == 1 and server.verifications == 1 and not server.drivers[0].closed
    assert server.count("CREATE CONSTRAINT") == len(q.CREATE_CONSTRAINT_QUERIES)
    assert server.count(q.AWAIT_INDEXES_QUERY) == 1 and server.count(q.SERVER_VERSION_QUERY) == 1
    with store_session(_settings(tmp_path, password="other")):  # other credentials: their own driver
        pass
    assert len(server.drivers) == 2 and server.drivers[1].kwargs["auth"] == ("neo4j", "other")


def test_the_vector_index_is_created_with_the_first_embeddings_at_their_size(server: Server, tmp_path: Path) -> None:
    with store_session(_settings(tmp_path)) as store:
        assert server.count("CREATE VECTOR INDEX") == 0  # empty graph: the size is not known yet
        store.upsert_experts([make_expert("civitai:1", embedding=unit(1, dim=1536))])
        assert server.index_dim == 1536
        store.upsert_experts([make_expert("civitai:2", embedding=unit(2, dim=1536))])
        assert server.count("CREATE VECTOR INDEX") == 1
        store.candidates(unit(3, dim=1536), k=1)
    assert server.count(q.CANDIDATES_VECTOR_INDEX_QUERY) == 1  # served by the index, not a brute-force scan


def test_an_index_of_another_size_is_replaced(server: Server, tmp_path: Path) -> None:
    server.stored_dim, server.index_dim, server.experts = 1536, 384, 1  # created by an older release
    with store_session(_settings(tmp_path)) as store:
        assert server.index_dim == 1536 and server.count(q.DROP_VECTOR_INDEX_QUERY) == 1
        store.candidates(unit(3, dim=1536), k=1)
    assert server.count(q.CANDIDATES_VECTOR_INDEX_QUERY) == 1
