"""Which backend a graph URL names, and opening it: the one module that knows every implementation.

The contract (``graphdb.store``) does not import its implementations; callers open a store here (or
through ``graphdb``). ``graphdb.store.open_store``/``store_session`` still resolve to these.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from core.settings import Settings
from graphdb.errors import GraphUnavailable
from graphdb.store import GraphStore

EMBEDDED_SCHEMES = ("embedded",)
NEO4J_SCHEMES = ("neo4j", "neo4j+s", "neo4j+ssc", "bolt", "bolt+s", "bolt+ssc")


def open_store(settings: Settings) -> GraphStore:
    """Open the backend named by ``settings.effective_graph_url`` (caller closes it).

    Use ``with store_session(settings) as store:`` where possible: the embedded database admits one
    process at a time, so hold it only for the length of an operation.
    """
    url = settings.effective_graph_url
    scheme = url.split("://", 1)[0] if "://" in url else ""
    if scheme in EMBEDDED_SCHEMES:
        from graphdb.embedded.store import EmbeddedGraphStore

        store: GraphStore = EmbeddedGraphStore(url.split("://", 1)[1], settings=settings)
    elif scheme in NEO4J_SCHEMES:
        from graphdb.neo4j.store import Neo4jGraphStore

        store = Neo4jGraphStore(
            url,
            user=settings.neo4j_user,
            password=settings.neo4j_password.get_secret_value(),
            database=settings.neo4j_database,
        )
    else:
        raise GraphUnavailable(
            f"unsupported graph URL {url!r}: use embedded://<path>, neo4j://host:7687 or bolt://host:7687"
        )
    store.ensure_schema()
    return store


@contextmanager
def store_session(settings: Settings) -> Iterator[GraphStore]:
    store = open_store(settings)
    try:
        yield store
    finally:
        store.close()
