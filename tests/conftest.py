"""Shared fixtures: isolated settings per test, a throw-away PostgreSQL database, the real embedder."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from core.settings import Settings, get_settings  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures"
PG_ADMIN_URL = os.environ.get("DIFFGRAPH_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("DIFFGRAPH_TEST_REDIS", "redis://127.0.0.1:6379")


@pytest.fixture
def settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Settings]:
    """Settings rooted in a temp data dir, also visible to ``get_settings()`` and the CLI via env."""
    for key in list(os.environ):
        if key.startswith("DIFFGRAPH_") and not key.startswith("DIFFGRAPH_TEST_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("DIFFGRAPH_DATA_DIR", str(tmp_path / "var"))
    monkeypatch.setenv("DIFFGRAPH_CONFIG", str(tmp_path / "none.toml"))
    # the tiny models' explicit budget (real models get their family's defaults, core.families)
    for key, value in (("CALIB_STEPS", "4"), ("CALIB_SIZE", "64"), ("GEN_STEPS", "20"), ("GEN_SIZE", "512"),
                       ("GEN_GUIDANCE", "7.0")):
        monkeypatch.setenv(f"DIFFGRAPH_{key}", value)
    get_settings.cache_clear()
    yield get_settings()
    get_settings.cache_clear()


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """A fresh PostgreSQL database for this test session, dropped afterwards."""
    import psycopg

    name = f"diffgraph_test_{uuid.uuid4().hex[:10]}"
    admin = PG_ADMIN_URL
    try:
        conn = psycopg.connect(admin, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as exc:  # CI starts PostgreSQL; a missing server is a failure
        pytest.fail(f"PostgreSQL not reachable at {admin}: {exc}")
    with conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base = admin.rsplit("/", 1)[0]
    yield f"{base}/{name}"
    from core.records import _engines

    for url, engine in list(_engines.items()):
        if name in url:
            engine.dispose()
            _engines.pop(url)
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def tiny_zoo(tmp_path_factory: pytest.TempPathFactory):
    """The random tiny SD1.5 zoo, built once per session (its files are only read)."""
    from tests.fakes.zoo import build_tiny_zoo

    return build_tiny_zoo(tmp_path_factory.mktemp("zoo"))


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Scorer paths of the tiny CLIP, built once per session."""
    from tests.fakes.clip import build_tiny_clip

    return build_tiny_clip(tmp_path_factory.mktemp("scorers"))


@pytest.fixture(scope="session")
def embedder():
    """The real offline all-MiniLM-L6-v2 (loaded once per session)."""
    from core.embeddings import get_embedder

    return get_embedder(Settings())


@pytest.fixture(scope="session")
def private_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``redis://127.0.0.1:<port>`` of a redis-server of this session's own: tests with real workers use
    it, so that test runs sharing one machine (and its Redis) never consume each other's tasks."""
    import signal
    import socket
    import subprocess
    import time

    import redis

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    workdir = tmp_path_factory.mktemp("redis")
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", str(workdir),
                             "--save", "", "--appendonly", "no"], stdout=(workdir / "redis.log").open("wb"),
                            stderr=subprocess.STDOUT, start_new_session=True)
    url = f"redis://127.0.0.1:{port}"
    client = redis.Redis.from_url(url)
    for _ in range(100):
        try:
            if client.ping():
                break
        except redis.exceptions.ConnectionError:
            time.sleep(0.05)
    else:
        proc.kill()
        pytest.fail("redis-server did not start")
    yield url
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
