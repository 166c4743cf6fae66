"""The Neo4j backend of the expert graph.

``queries.py`` owns every Cypher statement this backend sends (constants and ``(query, params)`` builders);
``store.py`` owns ``Neo4jGraphStore`` (the ``GraphStore`` contract over the official driver) and the mapping
between domain models and rows; ``lint.py`` checks every statement offline with Neo4j's own parser.
Only this package imports ``neo4j``.
"""

__all__ = ["Neo4jGraphStore"]


def __getattr__(name: str):  # keep ``import graphdb.neo4j.queries`` free of the driver import
    if name == "Neo4jGraphStore":
        from graphdb.neo4j.store import Neo4jGraphStore

        return Neo4jGraphStore
    raise AttributeError(name)
