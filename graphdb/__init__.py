"""The universal expert graph: the ``GraphStore`` contract and its Neo4j and embedded (LadybugDB) backends.

``open_store(settings)`` picks the backend from ``settings.effective_graph_url``
(``embedded://<path>`` or ``neo4j://``/``bolt://``/``neo4j+s://``...).
"""

from graphdb.store import (
    Candidate,
    CandidateFilter,
    ExpertFilter,
    GraphError,
    GraphStats,
    GraphStore,
    GraphUnavailable,
    UpsertResult,
    open_store,
    store_session,
)
from graphdb.subgraph import Subgraph, SubgraphEdge, SubgraphNode

__all__ = [
    "Candidate",
    "CandidateFilter",
    "ExpertFilter",
    "GraphError",
    "GraphStats",
    "GraphStore",
    "GraphUnavailable",
    "Subgraph",
    "SubgraphEdge",
    "SubgraphNode",
    "UpsertResult",
    "open_store",
    "store_session",
]
