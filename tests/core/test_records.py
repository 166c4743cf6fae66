from datetime import UTC, datetime

import pytest
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from core.records import (
    CalibrationRun,
    CrawlItem,
    CrawlState,
    ExpertFileRecord,
    GenerationJob,
    current_revision,
    session_scope,
)
from core.settings import Settings


@pytest.fixture(params=["sqlite", "postgresql"])
def db_settings(request: pytest.FixtureRequest, settings: Settings) -> Settings:
    if request.param == "sqlite":
        return settings
    return settings.model_copy(update={"sql_url": request.getfixturevalue("pg_url")})


def test_migrates_to_head_and_round_trips(db_settings: Settings) -> None:
    now = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    with session_scope(db_settings) as s:
        s.add(CrawlState(source="civitai", cursor="abc", watermark=now, runs=1, last_counts={"new": 3}))
        s.add(CrawlItem(source="civitai", version_id="1", expert_id="civitai:1", content_hash="h"))
        s.add(ExpertFileRecord(expert_id="civitai:1", name="a.safetensors", sha256="0" * 64, size_bytes=10))
        s.add(CalibrationRun(expert_id="civitai:1", status="failed", error="corrupt"))
        s.add(GenerationJob(id="task-1", prompt="a cat", params={"steps": 2}, image_paths=["x.png"]))
    assert current_revision(db_settings.effective_sql_url) == "0001"
    with session_scope(db_settings) as s:
        state = s.get(CrawlState, "civitai")
        assert state is not None and state.last_counts == {"new": 3} and state.cursor == "abc"
        assert state.watermark is not None and state.watermark.replace(tzinfo=UTC) == now
        job = s.get(GenerationJob, "task-1")
        assert job is not None and job.params == {"steps": 2} and job.image_paths == ["x.png"]
        run = s.scalars(select(CalibrationRun)).one()
        assert (run.status, run.error) == ("failed", "corrupt")


def test_generation_job_is_keyed_by_task_id(db_settings: Settings) -> None:
    with session_scope(db_settings) as s:
        s.add(GenerationJob(id="dup", prompt="p"))
    with pytest.raises(IntegrityError), session_scope(db_settings) as s:
        s.add(GenerationJob(id="dup", prompt="p again"))
    with session_scope(db_settings) as s:
        assert s.get(GenerationJob, "dup").prompt == "p"  # the failed write lost nothing


def test_expert_file_unique_per_expert_and_name(db_settings: Settings) -> None:
    with session_scope(db_settings) as s:
        s.add(ExpertFileRecord(expert_id="e", name="f.safetensors"))
    with pytest.raises(IntegrityError), session_scope(db_settings) as s:
        s.add(ExpertFileRecord(expert_id="e", name="f.safetensors"))
