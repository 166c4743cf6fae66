"""SQL operational records on SQLite and PostgreSQL: migrations match the models, every table round-trips,
unique constraints hold (complements ``tests/core/test_records.py``)."""

from __future__ import annotations

import time
from datetime import UTC, datetime

import pytest
from sqlalchemy import inspect, select
from sqlalchemy.exc import IntegrityError

from core.records import (
    Base,
    CalibrationRun,
    CrawlItem,
    CrawlState,
    ExpertFileRecord,
    GenerationJob,
    PlannerModel,
    current_revision,
    init_db,
    make_engine,
    session_scope,
    upgrade,
)
from core.settings import Settings

NOW = datetime(2026, 3, 4, 5, 6, 7, tzinfo=UTC)


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request: pytest.FixtureRequest, settings: Settings) -> Settings:
    if request.param == "sqlite":
        return settings
    pg = settings.model_copy(update={"sql_url": request.getfixturevalue("pg_url")})
    with init_db(pg).begin() as conn:  # the PostgreSQL database lives for the session: start each test empty
        for table in reversed(Base.metadata.sorted_tables):
            conn.execute(table.delete())
    return pg


def _utc(value: datetime | None) -> datetime | None:
    """SQLite returns naive datetimes for timezone-aware columns; compare in UTC."""
    if value is None:
        return None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def test_migrations_reach_head_and_match_the_models(db: Settings) -> None:
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    engine = init_db(db)
    assert current_revision(db.effective_sql_url) is not None
    tables = set(inspect(engine).get_table_names())
    assert set(Base.metadata.tables) <= tables
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert diff == [], f"models and migrations disagree: {diff}"
    upgrade(db.effective_sql_url)  # idempotent
    assert current_revision(db.effective_sql_url) is not None


def test_every_table_round_trips(db: Settings) -> None:
    with session_scope(db) as s:
        s.add(
            CrawlState(
                source="huggingface",
                cursor="next-page",
                watermark=NOW,
                runs=3,
                total_new=5,
                total_updated=2,
                total_skipped=1,
                total_failed=1,
                last_counts={"new": 5, "failed": 1},
                last_error="HTTP 500 on page 2",
                last_started_at=NOW,
                last_finished_at=NOW,
            )
        )
        s.add(
            CrawlItem(
                source="huggingface",
                version_id="user/repo@abc",
                expert_id="huggingface:user/repo",
                content_hash="c" * 64,
                source_updated_at=NOW,
                status="quarantined",
                reason="pickle",
            )
        )
        s.add(
            ExpertFileRecord(
                expert_id="huggingface:user/repo",
                name="lora.safetensors",
                url="https://x/y",
                sha256="f" * 64,
                autov2="ABCDEF1234",
                size_bytes=5 * 1024**3,
                format="SafeTensor",
                primary=False,
                local_path="/data/blobs/ff",
                status="downloaded",
            )
        )
        s.add(
            CalibrationRun(
                expert_id="huggingface:user/repo",
                task_id="t-1",
                status="succeeded",
                ref_set_version="v1",
                scorer_version="clip+aesthetic",
                n_prompts=24,
                n_images=48,
                metrics={"clip_gain": 0.031, "per_category": {"anime": 0.2}},
                finished_at=NOW,
                duration_s=12.5,
            )
        )
        s.add(
            GenerationJob(
                id="celery-123",
                prompt="a red fox, ünïcode ✓",
                params={"steps": 4, "seed": 7},
                status="SUCCESS",
                stage="sample",
                plan={"loras": [{"expert_id": "x", "coefficient": 0.5}]},
                image_paths=["/out/a.png", "/out/b.png"],
                timings={"sample": 1.5},
                attempts=2,
                worker="w1",
                finished_at=NOW,
            )
        )
        parent = PlannerModel(version="2026-03-04T05", path="/p/1.pt", metrics={"auc": 0.81})
        s.add(parent)
        s.flush()
        s.add(
            PlannerModel(version="2026-03-05T05", path="/p/2.pt", metrics={"auc": 0.84}, parent_id=parent.id)
        )
    with session_scope(db) as s:
        state = s.get(CrawlState, "huggingface")
        assert state is not None
        assert (state.cursor, state.runs, state.total_new, state.total_failed) == ("next-page", 3, 5, 1)
        assert state.last_counts == {"new": 5, "failed": 1} and _utc(state.watermark) == NOW
        item = s.get(CrawlItem, ("huggingface", "user/repo@abc"))
        assert item is not None and (item.status, item.reason) == ("quarantined", "pickle")
        assert item.first_seen_at is not None
        record = s.scalars(select(ExpertFileRecord)).one()
        assert record.size_bytes == 5 * 1024**3 and record.primary is False and record.status == "downloaded"
        run = s.scalars(select(CalibrationRun)).one()
        assert run.metrics == {"clip_gain": 0.031, "per_category": {"anime": 0.2}} and run.duration_s == 12.5
        job = s.get(GenerationJob, "celery-123")
        assert job is not None and job.prompt == "a red fox, ünïcode ✓"
        assert job.plan == {"loras": [{"expert_id": "x", "coefficient": 0.5}]}
        assert job.image_paths == ["/out/a.png", "/out/b.png"] and job.attempts == 2
        models = s.scalars(select(PlannerModel).order_by(PlannerModel.version)).all()
        assert [m.version for m in models] == ["2026-03-04T05", "2026-03-05T05"]
        assert models[1].parent_id == models[0].id and models[1].metrics == {"auc": 0.84}


@pytest.mark.parametrize(
    "make",
    [
        lambda: CrawlState(source="civitai"),
        lambda: CrawlItem(source="civitai", version_id="1", expert_id="civitai:1", content_hash="h"),
        lambda: ExpertFileRecord(expert_id="civitai:1", name="a.safetensors"),
        lambda: GenerationJob(id="job-1", prompt="p"),
        lambda: PlannerModel(version="v1", path="/p"),
    ],
    ids=["crawl_state", "crawl_items", "expert_files", "generation_jobs", "planner_models"],
)
def test_unique_constraints(db: Settings, make) -> None:
    with session_scope(db) as s:
        s.add(make())
    with pytest.raises(IntegrityError), session_scope(db) as s:
        s.add(make())
    model = type(make())
    with session_scope(db) as s:
        assert len(s.scalars(select(model)).all()) == 1  # the failed write changed nothing


def test_engine_is_shared_per_url(db: Settings) -> None:
    assert make_engine(db.effective_sql_url) is make_engine(db.effective_sql_url)


_MIGRATE = """
import os, sys, time
from pathlib import Path
from core.records import upgrade
go = Path(sys.argv[2])
(go.parent / f"ready-{os.getpid()}").touch()
while not go.exists():
    time.sleep(0.01)
upgrade(sys.argv[1])
"""


@pytest.mark.timeout(120)
@pytest.mark.parametrize("dialect", ["sqlite", "postgresql"])
def test_workers_starting_together_on_a_fresh_database_take_turns_migrating(dialect: str, tmp_path) -> None:
    """Three processes upgrade one fresh database at the same instant; every one succeeds."""
    import os
    import subprocess
    import sys
    import uuid
    from pathlib import Path

    import psycopg

    from tests.conftest import PG_ADMIN_URL

    name = f"diffgraph_mig_{uuid.uuid4().hex[:10]}"
    if dialect == "sqlite":
        url = f"sqlite:///{tmp_path / 'fresh.db'}"
    else:
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        url = f"{PG_ADMIN_URL.rsplit('/', 1)[0]}/{name}"
    go = tmp_path / "go"
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    try:
        procs = [subprocess.Popen([sys.executable, "-c", _MIGRATE, url, str(go)], cwd=root, env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(3)]
        deadline = time.monotonic() + 60  # every process has imported its modules and waits
        while len(list(go.parent.glob('ready-*'))) < len(procs) and time.monotonic() < deadline:
            time.sleep(0.05)
        go.touch()
        outs = [p.communicate(timeout=100) for p in procs]
        assert [p.returncode for p in procs] == [0] * 3, [err[-1500:] for _, err in outs if err]
        assert current_revision(url) is not None
    finally:
        if dialect == "postgresql":
            from core.records import _engines

            for key in [k for k in _engines if name in k]:
                _engines.pop(key).dispose()
            with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
