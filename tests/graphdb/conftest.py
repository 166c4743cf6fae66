"""Graph-store fixtures: one ``store`` per backend (embedded always; Neo4j when ``NEO4J_URI`` is set)."""

from __future__ import annotations

import os
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from core.types import Expert, ExpertKind

BACKENDS = ["embedded", "embedded-bulk"] + (["neo4j"] if os.environ.get("NEO4J_URI") else [])


def _wipe_neo4j(uri: str, user: str, password: str, database: str) -> None:
    import neo4j

    with neo4j.GraphDatabase.driver(uri, auth=(user, password)) as driver:
        driver.execute_query("MATCH (n) DETACH DELETE n", database_=database)


@pytest.fixture(params=BACKENDS)
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator:
    """A fresh, empty store. ``embedded-bulk`` forces every write through the ``COPY FROM`` bulk path."""
    if request.param == "neo4j":
        from graphdb.neo4j.store import Neo4jGraphStore

        uri = os.environ["NEO4J_URI"]
        user = os.environ.get("NEO4J_USER", "neo4j")
        password = os.environ.get("NEO4J_PASSWORD", "")
        database = os.environ.get("NEO4J_DATABASE", "neo4j")
        _wipe_neo4j(uri, user, password, database)
        backend = Neo4jGraphStore(uri, user=user, password=password, database=database)
    else:
        from graphdb.embedded.store import EmbeddedGraphStore

        threshold = 1 if request.param == "embedded-bulk" else 2000
        backend = EmbeddedGraphStore(str(tmp_path / "graph"), bulk_threshold=threshold)
    backend.ensure_schema()
    yield backend
    backend.close()


def unit(seed: int, dim: int = 384) -> list[float]:
    """A deterministic random unit vector."""
    v = np.random.default_rng(seed).standard_normal(dim).astype(np.float32)
    return (v / np.linalg.norm(v)).tolist()


def make_expert(expert_id: str, kind: str = "lora", embedding: list[float] | None = None, **fields) -> Expert:
    """A small hand-built expert with sensible defaults (``fields`` override anything)."""
    number = expert_id.split(":", 1)[-1]
    data = {
        "id": expert_id,
        "source": expert_id.split(":", 1)[0],
        "source_version_id": number,
        "name": f"Expert {number}",
        "kind": ExpertKind(kind),
        "base_model": "SD 1.5",
        "base_family": "sd15",
        "tags": ["style"],
        "creator": "alice",
        "content_hash": f"hash-{expert_id}",
        "embedding": embedding if embedding is not None else unit(zlib.crc32(expert_id.encode())),
        "files": [
            {"name": f"{number}.safetensors", "url": f"https://example.invalid/{number}", "sha256": "ab" * 32}
        ],
    }
    data.update(fields)
    return Expert.model_validate(data)
