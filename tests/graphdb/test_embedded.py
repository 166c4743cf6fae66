"""Embedded-backend specifics: the one-process lock, shared in-process databases, open_store URLs."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from graphdb.embedded.store import EmbeddedGraphStore, _embedding_matrix
from graphdb.store import GraphError, GraphUnavailable, open_store, store_session
from tests.graphdb.conftest import make_expert, unit

ROOT = Path(__file__).resolve().parents[2]


def _hold(path: Path, seconds: float) -> subprocess.Popen:
    """Another process that opens the graph, says so, holds it for ``seconds`` and closes it."""
    code = textwrap.dedent(
        f"""
        import sys, time
        from graphdb.embedded.store import EmbeddedGraphStore
        store = EmbeddedGraphStore({str(path)!r})
        print("ready", flush=True)
        time.sleep({seconds})
        store.close()
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    return proc


def test_second_process_waits_then_fails_clearly(tmp_path: Path):
    path = tmp_path / "graph"
    holder = _hold(path, 60)
    try:
        started = time.monotonic()
        with pytest.raises(GraphUnavailable, match="locked by another process"):
            EmbeddedGraphStore(str(path), lock_timeout_s=0.5)
        assert time.monotonic() - started >= 0.5  # it retried before giving up
    finally:
        holder.kill()
        holder.wait()
    store = EmbeddedGraphStore(str(path), lock_timeout_s=5)  # the lock went with the process
    store.close()


def test_open_retries_until_the_holder_closes(tmp_path: Path):
    path = tmp_path / "graph"
    holder = _hold(path, 1.0)
    try:
        store = EmbeddedGraphStore(str(path), lock_timeout_s=30)
        assert holder.wait(timeout=30) == 0
        store.upsert_experts([make_expert("civitai:1")])
        store.close()
    finally:
        holder.kill()
        holder.wait()


def test_stores_in_one_process_share_the_database(tmp_path: Path):
    path = str(tmp_path / "graph")
    outer = EmbeddedGraphStore(path)
    inner = EmbeddedGraphStore(path)
    outer.upsert_experts([make_expert("civitai:1", embedding=unit(1))])
    assert [c.expert.id for c in inner.candidates(unit(1), k=1)] == ["civitai:1"]
    inner.upsert_experts([make_expert("civitai:2", embedding=unit(2))])
    assert [c.expert.id for c in outer.candidates(unit(2), k=1)] == ["civitai:2"]  # cache invalidated
    inner.close()
    assert outer.get_expert("civitai:2").id == "civitai:2"
    outer.close()
    with pytest.raises(GraphError, match="closed"):
        outer.get_expert("civitai:1")
    reopened = EmbeddedGraphStore(path)
    assert reopened.stats().nodes["Expert"] == 2  # persisted
    reopened.close()


def test_open_store_picks_the_backend_from_the_url(settings):
    with store_session(settings) as store:
        assert isinstance(store, EmbeddedGraphStore)
        assert Path(store.path).parent == (settings.data_dir).resolve()
    bad = settings.model_copy(update={"graph_url": "mysql://nope"})
    with pytest.raises(GraphUnavailable, match="unsupported graph URL"):
        open_store(bad)


def test_unopenable_path_is_reported(tmp_path: Path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(GraphUnavailable):
        EmbeddedGraphStore(str(blocker / "sub" / "graph"), lock_timeout_s=0.1)


def test_embedding_matrix_handles_missing_rows():
    import pyarrow as pa

    column = pa.chunked_array(
        [
            pa.array([[1.0, 2.0], None, [3.0]], pa.list_(pa.float32())),
            pa.array([[5.0, 6.0]], pa.list_(pa.float32())),
        ]
    )
    assert np.array_equal(_embedding_matrix(column, 2), [[1, 2], [0, 0], [0, 0], [5, 6]])


def test_cached_embeddings_see_writes_by_another_process(tmp_path: Path):
    path = str(tmp_path / "graph")
    with EmbeddedGraphStore(path) as store:
        store.upsert_experts([make_expert("civitai:1", embedding=unit(1))])
        assert [c.expert.id for c in store.candidates(unit(2), k=5)] == ["civitai:1"]  # bank cached
    code = textwrap.dedent(
        f"""
        from graphdb.embedded.store import EmbeddedGraphStore
        from tests.graphdb.conftest import make_expert, unit
        with EmbeddedGraphStore({path!r}) as store:
            store.upsert_experts([make_expert("civitai:2", embedding=unit(2))])
        """
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=120)
    with EmbeddedGraphStore(path) as store:
        assert [c.expert.id for c in store.candidates(unit(2), k=5)][0] == "civitai:2"
        assert len(store.activate_subgraph(["civitai:2"]).nodes) == 1
