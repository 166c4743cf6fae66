"""Operational records in SQL (SQLAlchemy 2.x): crawl state, expert files, calibration runs, generation jobs.

SQLite by default, PostgreSQL in production. The schema is owned by Alembic migrations in
``core/migrations``; ``init_db`` upgrades to head, so a fresh data dir works without a manual step.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    event,
)
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from core.settings import Settings
from core.types import utcnow


class Base(DeclarativeBase):
    pass


class CrawlState(Base):
    """Per-source watermark and counters of the incremental crawl."""

    __tablename__ = "crawl_state"

    source: Mapped[str] = mapped_column(String(64), primary_key=True)
    cursor: Mapped[str | None] = mapped_column(String(1024))
    watermark: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    runs: Mapped[int] = mapped_column(Integer, default=0)
    total_new: Mapped[int] = mapped_column(Integer, default=0)
    total_updated: Mapped[int] = mapped_column(Integer, default=0)
    total_skipped: Mapped[int] = mapped_column(Integer, default=0)
    total_failed: Mapped[int] = mapped_column(Integer, default=0)
    last_counts: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    last_error: Mapped[str | None] = mapped_column(Text)
    last_started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    last_finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class CrawlItem(Base):
    """One source version seen by the crawler, with the hash of its record (change detection)."""

    __tablename__ = "crawl_items"

    source: Mapped[str] = mapped_column(String(64), primary_key=True)
    version_id: Mapped[str] = mapped_column(String(512), primary_key=True)
    expert_id: Mapped[str] = mapped_column(String(512), index=True)
    content_hash: Mapped[str] = mapped_column(String(64))
    source_updated_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    first_seen_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    last_seen_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    # registered | quarantined (dropped by a rule about the record itself) | failed (transient: fetched again
    # by the next run, up to crawler.state.MAX_ATTEMPTS times)
    status: Mapped[str] = mapped_column(String(32), default="registered")
    reason: Mapped[str | None] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")


class ExpertFileRecord(Base):
    """A weight file of an expert and its download state in the content-addressed store."""

    __tablename__ = "expert_files"
    __table_args__ = (UniqueConstraint("expert_id", "name", name="uq_expert_file"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    expert_id: Mapped[str] = mapped_column(String(512), index=True)
    name: Mapped[str] = mapped_column(String(512))
    url: Mapped[str] = mapped_column(String(4096), default="")
    sha256: Mapped[str | None] = mapped_column(String(64), index=True)
    autov2: Mapped[str | None] = mapped_column(String(64))
    size_bytes: Mapped[int | None] = mapped_column(BigInteger)
    format: Mapped[str] = mapped_column(String(32), default="SafeTensor")
    primary: Mapped[bool] = mapped_column(default=True)
    local_path: Mapped[str | None] = mapped_column(String(4096))
    status: Mapped[str] = mapped_column(String(32), default="pending")  # pending|downloaded|failed|refused
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, onupdate=utcnow)


class CalibrationRun(Base):
    """One calibration attempt of one expert."""

    __tablename__ = "calibration_runs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    expert_id: Mapped[str] = mapped_column(String(512), index=True)
    task_id: Mapped[str | None] = mapped_column(String(255), index=True)
    status: Mapped[str] = mapped_column(String(32), default="running")  # running|succeeded|failed
    ref_set_version: Mapped[str] = mapped_column(String(64), default="")
    scorer_version: Mapped[str] = mapped_column(String(255), default="")
    n_prompts: Mapped[int] = mapped_column(Integer, default=0)
    n_images: Mapped[int] = mapped_column(Integer, default=0)
    metrics: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    error: Mapped[str | None] = mapped_column(Text)
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    duration_s: Mapped[float | None] = mapped_column(Float)
    # why a failed run failed: expert (its own weights/files; counts towards giving up), setup (no base,
    # no scorer) or transient (graph busy, network)
    cause: Mapped[str | None] = mapped_column(String(16))


class GenerationJob(Base):
    """A generation request keyed by its task id: a redelivered task finds and reuses its row."""

    __tablename__ = "generation_jobs"

    id: Mapped[str] = mapped_column(String(255), primary_key=True)
    prompt: Mapped[str] = mapped_column(Text)
    params: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    status: Mapped[str] = mapped_column(String(32), default="PENDING", index=True)
    stage: Mapped[str | None] = mapped_column(String(64))
    plan: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    image_paths: Mapped[list[str] | None] = mapped_column(JSON)
    timings: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    error: Mapped[str | None] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    worker: Mapped[str | None] = mapped_column(String(255))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, onupdate=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # the runner holding the job (``<worker>#<token>``) and until when; see ``deploy.lease``
    lease_owner: Mapped[str | None] = mapped_column(String(255))
    lease_expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class PlannerModel(Base):
    """A trained planner checkpoint (versioned) and its training metrics."""

    __tablename__ = "planner_models"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    version: Mapped[str] = mapped_column(String(64), unique=True)
    path: Mapped[str] = mapped_column(String(4096))
    metrics: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    parent_id: Mapped[int | None] = mapped_column(ForeignKey("planner_models.id"))


MIGRATIONS_DIR = Path(__file__).with_name("migrations")
_engines: dict[str, Engine] = {}
_lock = threading.Lock()


def make_engine(url: str) -> Engine:
    """One engine per URL per process (SQLite files get WAL and a busy timeout)."""
    with _lock:
        if url in _engines:
            return _engines[url]
        if url.startswith("sqlite"):
            path = url.split("///", 1)[-1]
            if path and path != ":memory:":
                Path(path).parent.mkdir(parents=True, exist_ok=True)
            engine = create_engine(url, connect_args={"timeout": 30})

            @event.listens_for(engine, "connect")
            def _pragmas(dbapi_conn: Any, _: Any) -> None:
                cur = dbapi_conn.cursor()
                cur.execute("PRAGMA journal_mode=WAL")
                cur.execute("PRAGMA busy_timeout=30000")
                cur.close()

        else:
            if url.startswith("postgresql://") or url.startswith("postgres://"):
                url_driver = "postgresql+psycopg://" + url.split("://", 1)[1]
            else:
                url_driver = url
            engine = create_engine(url_driver, pool_pre_ping=True)
        _engines[url] = engine
        return engine


def alembic_config(url: str) -> Any:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


MIGRATION_LOCK_KEY = 0x64696666  # "diff": the PostgreSQL advisory lock the migrations take turns on


@contextmanager
def migration_lock(url: str) -> Iterator[None]:
    """Held while migrating ``url``, so workers starting together on a fresh database take turns instead
    of racing to create the same tables: a PostgreSQL advisory lock, a lock file next to a SQLite file."""
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if not path or path == ":memory:":
            yield
            return
        from filelock import FileLock

        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with FileLock(f"{path}.migrate.lock"):
            yield
        return
    engine = make_engine(url)
    if engine.dialect.name != "postgresql":
        yield
        return
    with engine.connect() as conn:
        conn.exec_driver_sql(f"SELECT pg_advisory_lock({MIGRATION_LOCK_KEY})")
        conn.commit()
        try:
            yield
        finally:
            conn.exec_driver_sql(f"SELECT pg_advisory_unlock({MIGRATION_LOCK_KEY})")
            conn.commit()


def upgrade(url: str, revision: str = "head") -> None:
    """Apply migrations up to ``revision`` (``diffgraph db upgrade``), one process at a time."""
    from alembic import command

    with migration_lock(url):
        command.upgrade(alembic_config(url), revision)


def current_revision(url: str) -> str | None:
    from alembic.runtime.migration import MigrationContext

    with make_engine(url).connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


_initialised: set[str] = set()


def init_db(settings: Settings) -> Engine:
    """Engine for the configured SQL URL, migrated to head once per process."""
    url = settings.effective_sql_url
    engine = make_engine(url)
    if url not in _initialised:
        upgrade(url)
        _initialised.add(url)
    return engine


@contextmanager
def session_scope(settings: Settings) -> Iterator[Session]:
    """A transaction: commit on success, roll back on error."""
    engine = init_db(settings)
    session = sessionmaker(engine, expire_on_commit=False)()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()
