"""The universal expert graph: the ``GraphStore`` contract and its Neo4j and embedded (LadybugDB) backends.

``open_store(settings)`` (``graphdb.backends``) picks the backend from ``settings.effective_graph_url``
(``embedded://<path>`` or ``neo4j://``/``bolt://``/``neo4j+s://``...).
"""

from graphdb.backends import open_store, store_session
from graphdb.errors import GraphBusy, GraphError, GraphUnavailable
from graphdb.store import (
    Candidate,
    CandidateFilter,
    ExpertFilter,
    GraphStats,
    GraphStore,
    UpsertResult,
)
from graphdb.subgraph import Subgraph, SubgraphEdge, SubgraphNode

__all__ = [
    "Candidate",
    "CandidateFilter",
    "ExpertFilter",
    "GraphBusy",
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
