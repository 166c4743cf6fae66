"""``diffgraph worker`` enforces task time limits (prefork pool), with a real worker and Redis.

The worker imports the test tasks of ``tests.deploy.timelimit_tasks`` through a ``sitecustomize`` on its
``PYTHONPATH``, so the command under test is the real ``diffgraph worker``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import redis
from celery.result import AsyncResult

from core.records import GenerationJob, session_scope
from core.settings import Settings
from deploy.celery_app import enforce_task_time_limits, make_app

ROOT = Path(__file__).resolve().parents[2]
DIFFGRAPH = str(Path(sys.executable).parent / "diffgraph")
pytestmark = pytest.mark.timeout(180)


def test_short_hard_limits_get_a_soft_limit_below_them() -> None:
    app = make_app(Settings(broker_url="memory://"))

    @app.task(name="t.short", time_limit=2, shared=False)
    def short() -> None: ...

    @app.task(name="t.own_soft", time_limit=10, soft_time_limit=5, shared=False)
    def own_soft() -> None: ...

    @app.task(name="t.long", time_limit=100_000, shared=False)
    def long() -> None: ...

    changed = enforce_task_time_limits(app)
    assert "t.short" in changed and app.tasks["t.short"].soft_time_limit == pytest.approx(1.6)
    assert "t.own_soft" not in changed and app.tasks["t.own_soft"].soft_time_limit == 5
    assert "t.long" not in changed  # the app-wide soft limit comes first and arms its hard limit


def _wait(app, task_id: str, timeout: float = 60) -> AsyncResult:
    res = AsyncResult(task_id, app=app)
    deadline = time.monotonic() + timeout
    while res.state not in {"SUCCESS", "FAILURE"}:
        assert time.monotonic() < deadline, f"task {task_id} unfinished: {res.state}"
        time.sleep(0.1)
    return res


def test_diffgraph_worker_enforces_time_limits_and_records_killed_jobs(tmp_path: Path, private_redis: str) -> None:
    redis_db = f"{private_redis}/10"
    redis.Redis.from_url(redis_db).flushdb()
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text("import tests.deploy.timelimit_tasks  # noqa: F401\n")
    settings = Settings(data_dir=tmp_path / "var", broker_url=redis_db, result_url=redis_db)
    env = {k: v for k, v in os.environ.items() if not k.startswith("DIFFGRAPH_") or k.startswith("DIFFGRAPH_TEST_")}
    env.update({"PYTHONPATH": f"{site}{os.pathsep}{ROOT}", "DIFFGRAPH_DATA_DIR": str(settings.data_dir),
                "DIFFGRAPH_BROKER_URL": redis_db, "DIFFGRAPH_RESULT_URL": redis_db,
                "DIFFGRAPH_CONFIG": str(tmp_path / "none.toml")})
    log = tmp_path / "worker.log"
    hostname = f"tl-{uuid.uuid4().hex[:6]}@test"
    with log.open("wb") as out:
        proc = subprocess.Popen([DIFFGRAPH, "worker", "--queues", "ingest", "--pool", "solo", "--concurrency", "1",
                                 "--hostname", hostname], env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while f"{hostname} ready." not in log.read_text(errors="replace"):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text(errors="replace")[-3000:]
            time.sleep(0.2)
        text = log.read_text(errors="replace")
        assert "--pool solo is deprecated" in text and "(prefork)" in text

        app = make_app(settings)
        soft = _wait(app, app.send_task("tests.sleep_past_limit", queue="ingest").id)
        assert soft.state == "FAILURE" and type(soft.result).__name__ == "SoftTimeLimitExceeded"

        job_id = uuid.uuid4().hex  # a generation row left STARTED by the process about to be killed
        with session_scope(settings) as s:
            s.add(GenerationJob(id=job_id, prompt="p", params={}, status="STARTED", stage="sample", attempts=1))
        hard = _wait(app, app.send_task("tests.hang_past_hard_limit", queue="ingest", task_id=job_id).id)
        assert hard.state == "FAILURE" and type(hard.result).__name__ == "TimeLimitExceeded"
        deadline = time.monotonic() + 20  # the worker records it right after publishing the task's state
        while True:
            with session_scope(settings) as s:
                row = s.get(GenerationJob, job_id)
            if row.status != "STARTED" or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert row.status == "FAILURE" and "time limit exceeded" in row.error
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
        proc.wait(timeout=30)
        redis.Redis.from_url(redis_db).flushdb()
