"""Reliability of the generation path with real ``celery worker`` processes, Redis and PostgreSQL.

One pair of prefork workers (concurrency 1) on this session's own redis-server serves the module; the Redis-restart test runs
its own AOF ``redis-server`` on a free port because restarting the shared Redis would hurt other users.
The broker's visibility timeout is shortened (``DIFFGRAPH_VISIBILITY_TIMEOUT_S``) so that a killed
worker's task is redelivered within seconds.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis
from celery.result import AsyncResult

from core.queue import send
from core.records import GenerationJob, session_scope
from core.settings import Settings
from deploy.celery_app import make_app
from graphdb.store import store_session
from tests.deploy.conftest import explicit_plan, register, zoo_experts

ROOT = Path(__file__).resolve().parents[2]
DIFFGRAPH = str(Path(sys.executable).parent / "diffgraph")
VISIBILITY_TIMEOUT_S = 15
LEASE_S = 6  # a killed worker's job is taken over this long after its last renewal
TINY = {"steps": 1, "width": 32, "height": 32}
pytestmark = pytest.mark.timeout(300)


def _kill_group(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=30)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Workers:
    """``diffgraph worker`` subprocesses (prefork, concurrency 1) on the ``generate`` queue, killed on teardown."""

    env: dict[str, str]
    logdir: Path
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    def start(self, name: str) -> str:
        """Spawn a worker (it starts in the background; see ``wait_ready``)."""
        hostname = f"{name}@deploytest"
        with (self.logdir / f"{hostname}.log").open("ab") as log:
            self.procs[hostname] = subprocess.Popen(
                [DIFFGRAPH, "worker", "--queues", "generate", "--concurrency", "1", "--hostname", hostname,
                 "--loglevel", "INFO"],
                env=self.env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )
        return hostname

    def wait_ready(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        for hostname, proc in self.procs.items():
            log = self.logdir / f"{hostname}.log"
            while f"{hostname} ready." not in log.read_text(errors="replace"):
                if proc.poll() is not None or time.monotonic() > deadline:
                    self.stop_all()
                    pytest.fail(f"worker {hostname} did not start:\n{log.read_text(errors='replace')[-3000:]}")
                time.sleep(0.2)

    def kill(self, hostname: str) -> None:
        _kill_group(self.procs.pop(hostname))

    def stop_all(self) -> None:
        for hostname in list(self.procs):
            self.kill(hostname)


@dataclass
class Stack:
    settings: Settings
    env: dict[str, str]
    experts: dict[str, Any]
    workers: Workers
    tmp: Path

    def submit(self, prompt: str, options: dict[str, Any], settings: Settings | None = None) -> str:
        task_id = uuid.uuid4().hex
        assert send(settings or self.settings, "deploy.generate", (prompt, options), task_id=task_id) == task_id
        return task_id


def _env(settings: Settings) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DIFFGRAPH_") or k.startswith("DIFFGRAPH_TEST_")}
    env.update({
        "DIFFGRAPH_DATA_DIR": str(settings.data_dir),
        "DIFFGRAPH_SQL_URL": settings.sql_url,
        "DIFFGRAPH_BROKER_URL": settings.broker_url,
        "DIFFGRAPH_RESULT_URL": settings.result_url,
        "DIFFGRAPH_BASE_MODELS": json.dumps(settings.base_models),
        "DIFFGRAPH_DEVICE": "cpu",
        "DIFFGRAPH_DTYPE": "fp32",
        "DIFFGRAPH_CONFIG": str(settings.data_dir / "none.toml"),
        "DIFFGRAPH_VISIBILITY_TIMEOUT_S": str(VISIBILITY_TIMEOUT_S),
        "DIFFGRAPH_GENERATION_LEASE_S": str(LEASE_S),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    })
    return env


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, pg_url: str, tiny_zoo, private_redis: str) -> Iterator[Stack]:
    redis_db = f"{private_redis}/13"
    tmp = tmp_path_factory.mktemp("deploy-workers")
    redis.Redis.from_url(redis_db).flushdb()
    settings = Settings(data_dir=tmp / "var", sql_url=pg_url, broker_url=redis_db, result_url=redis_db,
                        base_models={"sd15": str(tiny_zoo.base_dir)}, device="cpu", dtype="fp32")
    experts = zoo_experts(tiny_zoo, tmp / "corrupt")
    register(settings, experts)
    workers = Workers(_env(settings), tmp)
    try:
        workers.start("w1")
        workers.start("w2")
        workers.wait_ready()
        yield Stack(settings, workers.env, experts, workers, tmp)
    finally:
        workers.stop_all()
        redis.Redis.from_url(redis_db).flushdb()


def _wait(settings: Settings, ids: list[str], timeout: float) -> dict[str, AsyncResult]:
    app = make_app(settings)
    results = {i: AsyncResult(i, app=app) for i in ids}
    deadline = time.monotonic() + timeout
    pending = set(ids)
    while pending:
        pending = {i for i in pending if results[i].state not in {"SUCCESS", "FAILURE"}}
        if pending and time.monotonic() > deadline:
            states = {i: results[i].state for i in pending}
            pytest.fail(f"{len(pending)} task(s) unfinished after {timeout:.0f} s: {states}")
        time.sleep(0.25)
    return results


def _rows(settings: Settings, ids: list[str]) -> list[GenerationJob]:
    with session_scope(settings) as s:
        return list(s.query(GenerationJob).filter(GenerationJob.id.in_(ids)))


def _graph_counts(settings: Settings) -> tuple[int, int]:
    with store_session(settings) as store:
        stats = store.stats()
    return stats.nodes.get("Generation", 0), stats.relationships.get("USED", 0)


def test_cli_submit_wait_json_against_a_real_worker(stack: Stack) -> None:
    before = _graph_counts(stack.settings)
    plan_file = stack.tmp / "plan.json"
    plan_file.write_text(json.dumps(explicit_plan(stack.experts)))
    proc = subprocess.run(
        [DIFFGRAPH, "generate", "a red fox in the snow", "--plan", str(plan_file), "--steps", "2", "--width", "64",
         "--height", "64", "--seed", "3", "--submit", "--wait", "--json", "--timeout", "150"],
        env=stack.env, cwd=ROOT, capture_output=True, text=True, timeout=200,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    assert result["status"] == "SUCCESS" and result["prompt"] == "a red fox in the snow"
    assert [pe["expert_id"] for pe in result["plan"]["loras"]] == [stack.experts["lora0"].id]
    assert {"sample", "total"} <= set(result["timings"])
    (path,) = result["image_paths"]
    assert Path(path).is_file() and path.endswith(f"images/{result['task_id']}/0.png")
    (row,) = _rows(stack.settings, [result["task_id"]])
    assert row.status == "SUCCESS" and row.worker in stack.workers.procs and row.params["seed"] == 3
    assert _graph_counts(stack.settings) == (before[0] + 1, before[1] + 2)


def test_bad_inputs_fail_with_clear_messages_and_no_partial_records(stack: Stack) -> None:
    before = _graph_counts(stack.settings)
    unknown = explicit_plan(stack.experts)
    unknown["checkpoints"][0]["expert_id"] = "civitai:424242"
    cases = {
        stack.submit("", TINY): ("ValidationFailed", "prompt is empty"),
        stack.submit("x" * 100_000, TINY): ("ValidationFailed", "100,000 characters"),
        stack.submit("a fox", {**TINY, "plan": unknown}): ("NotFoundError", "civitai:424242"),
        stack.submit("a fox", {**TINY, "steps": -4}): ("ValidationFailed", "steps"),
    }
    corrupt_id = stack.submit("a fox", {**TINY, "plan": explicit_plan(stack.experts, lora="corrupt")})
    results = _wait(stack.settings, [*cases, corrupt_id], timeout=120)
    for task_id, (exc_name, needle) in cases.items():
        res = results[task_id]
        assert res.state == "FAILURE", (task_id, res.state)
        assert type(res.result).__name__ == exc_name and needle in str(res.result)
    assert _rows(stack.settings, list(cases)) == []  # rejected before anything was written
    corrupt = results[corrupt_id]
    assert corrupt.state == "FAILURE"
    (row,) = _rows(stack.settings, [corrupt_id])
    assert row.status == "FAILURE" and row.error == str(corrupt.result) and row.attempts == 1  # not retried
    assert not (stack.settings.data_dir / "images" / corrupt_id).exists()
    for task_id in cases:
        assert not (stack.settings.data_dir / "images" / task_id).exists()
    assert _graph_counts(stack.settings) == before


def test_fifty_concurrent_generations_two_workers(stack: Stack) -> None:
    before = _graph_counts(stack.settings)
    options = {**TINY, "plan": explicit_plan(stack.experts, lora=None)}
    ids = [stack.submit(f"a fox number {i}", {**options, "seed": i}) for i in range(50)]
    results = _wait(stack.settings, ids, timeout=240)
    assert {r.state for r in results.values()} == {"SUCCESS"}
    rows = _rows(stack.settings, ids)
    assert len(rows) == 50 and {r.id for r in rows} == set(ids)
    assert {r.status for r in rows} == {"SUCCESS"}
    assert {r.worker for r in rows} == set(stack.workers.procs)  # both workers took turns
    assert all(Path(r.image_paths[0]).is_file() for r in rows)
    assert _graph_counts(stack.settings) == (before[0] + 50, before[1] + 50)


def test_a_second_delivery_of_a_running_job_waits_and_does_not_run_it_again(stack: Stack) -> None:
    """The same task delivered twice at once (as after a visibility timeout): each worker receives a copy,
    one runs the job, the other waits for its lease and returns the stored result."""
    before = _graph_counts(stack.settings)
    task_id = uuid.uuid4().hex
    options = {"steps": 8, "width": 64, "height": 64, "plan": explicit_plan(stack.experts, lora=None)}
    for _ in range(2):
        assert send(stack.settings, "deploy.generate", ("a fox delivered twice", options), task_id=task_id) == task_id
    results = _wait(stack.settings, [task_id], timeout=120)
    assert results[task_id].state == "SUCCESS"
    deadline = time.monotonic() + 60
    received = f"deploy.generate[{task_id}] received"
    succeeded = f"deploy.generate[{task_id}] succeeded"
    logs = lambda: [(stack.tmp / f"{h}.log").read_text(errors="replace") for h in stack.workers.procs]  # noqa: E731
    while sum(text.count(succeeded) for text in logs()) < 2:  # both copies finished (the waiter returns too)
        assert time.monotonic() < deadline, "the second delivery never finished"
        time.sleep(0.25)
    assert all(received in text for text in logs())  # each worker got a copy: a real second delivery
    (row,) = _rows(stack.settings, [task_id])
    assert row.status == "SUCCESS" and row.attempts == 1 and row.lease_owner is None  # run once
    assert _graph_counts(stack.settings) == (before[0] + 1, before[1] + 1)


def test_sigkill_mid_generation_completes_exactly_once(stack: Stack) -> None:
    before = _graph_counts(stack.settings)
    task_id = stack.submit("a slow fox", {"steps": 16, "width": 32, "height": 32,
                                          "plan": explicit_plan(stack.experts)})
    app = make_app(stack.settings)
    res = AsyncResult(task_id, app=app)
    deadline = time.monotonic() + 120
    while not (res.state == "PROGRESS" and res.info.get("stage") == "sample" and res.info.get("step", 0) >= 1):
        assert res.state not in {"SUCCESS", "FAILURE"}, f"finished before it could be killed: {res.state}"
        assert time.monotonic() < deadline, f"no sampling progress: {res.state} {res.info}"
        time.sleep(0.05)
    (row,) = _rows(stack.settings, [task_id])
    victim = row.worker
    assert row.attempts == 1  # one delivery in flight: the one about to die
    stack.workers.kill(victim)
    assert _rows(stack.settings, [task_id])[0].status == "STARTED"
    stack.workers.start("w3")  # a new worker joins; the survivor or the newcomer picks the task up

    results = _wait(stack.settings, [task_id], timeout=180)
    stack.workers.wait_ready()
    assert results[task_id].state == "SUCCESS"
    (row,) = _rows(stack.settings, [task_id])
    assert row.status == "SUCCESS" and row.attempts >= 2 and row.worker != victim
    assert len(row.image_paths) == 1 and Path(row.image_paths[0]).is_file()
    assert _graph_counts(stack.settings) == (before[0] + 1, before[1] + 2)


def test_redis_restart_loses_no_queued_task(stack: Stack) -> None:
    """An AOF Redis is SIGKILLed and restarted while tasks wait in the queue; every task completes once."""
    port = _free_port()
    redis_dir = stack.tmp / "redis-aof"
    redis_dir.mkdir()
    redis_cmd = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", str(redis_dir),
                 "--appendonly", "yes", "--appendfsync", "always", "--save", ""]
    url = f"redis://127.0.0.1:{port}/0"

    def start_redis() -> subprocess.Popen:
        proc = subprocess.Popen(redis_cmd, stdout=(stack.tmp / "redis.log").open("ab"), stderr=subprocess.STDOUT,
                                start_new_session=True)
        client = redis.Redis.from_url(url)
        for _ in range(100):
            try:
                if client.ping():
                    return proc
            except redis.exceptions.ConnectionError:
                time.sleep(0.1)
        _kill_group(proc)
        pytest.fail("redis-server did not start")

    settings = stack.settings.model_copy(update={"broker_url": url, "result_url": url})
    server = start_redis()
    workers = Workers({**stack.env, "DIFFGRAPH_BROKER_URL": url, "DIFFGRAPH_RESULT_URL": url}, stack.tmp)
    try:
        workers.start("r1")
        workers.wait_ready()
        before = _graph_counts(settings)
        options = {"steps": 8, "width": 64, "height": 64, "plan": explicit_plan(stack.experts, lora=None)}
        ids = [stack.submit(f"a patient fox {i}", {**options, "seed": i}, settings=settings) for i in range(5)]
        first = AsyncResult(ids[0], app=make_app(settings))
        deadline = time.monotonic() + 120
        while first.state not in {"PROGRESS", "SUCCESS"}:
            assert time.monotonic() < deadline, f"first task never started: {first.state}"
            time.sleep(0.05)
        queued = redis.Redis.from_url(url).llen("generate")
        assert queued >= 2  # tasks are waiting in the broker when it dies

        _kill_group(server)  # no shutdown save: only the append-only file keeps the queue
        server = start_redis()
        assert redis.Redis.from_url(url).llen("generate") >= queued - 1

        results = _wait(settings, ids, timeout=200)
        assert {r.state for r in results.values()} == {"SUCCESS"}
        rows = _rows(settings, ids)
        assert len(rows) == 5 and {r.status for r in rows} == {"SUCCESS"}
        assert _graph_counts(settings) == (before[0] + 5, before[1] + 5)
    finally:
        workers.stop_all()
        _kill_group(server)
