"""Embedded (LadybugDB, file-backed, one process at a time) backend of the expert graph.

``engine`` is the only module that imports the engine package; ``store`` implements ``GraphStore``.
"""

from graphdb.embedded.store import EmbeddedGraphStore

__all__ = ["EmbeddedGraphStore"]
