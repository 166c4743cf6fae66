"""``calibration.calibrate_expert`` through a real Celery worker process on the local Redis (not eager)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from core.records import CalibrationRun, session_scope
from graphdb.store import store_session
from tests.calibration.conftest import calib_env, local_expert

BROKER_DB, RESULT_DB = 11, 12  # this area's own Redis databases
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def redis_urls(private_redis: str) -> Iterator[tuple[str, str]]:
    import redis

    broker, result = f"{private_redis}/{BROKER_DB}", f"{private_redis}/{RESULT_DB}"
    for url in (broker, result):
        try:
            redis.Redis.from_url(url, socket_connect_timeout=3).flushdb()
        except redis.ConnectionError as exc:  # CI runs Redis; its absence is a failure, not a skip
            pytest.fail(f"Redis not reachable at {url}: {exc}")
    yield broker, result
    for url in (broker, result):
        redis.Redis.from_url(url, socket_connect_timeout=3).flushdb()


def test_calibrate_expert_task_runs_in_a_real_worker(settings, tiny_zoo, tiny_clip, register, corrupt_checkpoint,
                                                     redis_urls, monkeypatch, tmp_path) -> None:
    from core.queue import _client, send
    from core.settings import get_settings

    broker, result = redis_urls
    env_vars = {**calib_env(tiny_zoo, tiny_clip, prompts=2), "DIFFGRAPH_BROKER_URL": broker,
                "DIFFGRAPH_RESULT_URL": result, "DIFFGRAPH_CALIB_MAX_ATTEMPTS": "2"}
    for k, v in env_vars.items():
        monkeypatch.setenv(k, v)
    get_settings.cache_clear()
    settings = get_settings()
    good = local_expert(tiny_zoo.checkpoints[0], "ckpt-w")
    bad = local_expert(corrupt_checkpoint, "corrupt-w")
    register(settings, [good, bad])  # the graph is closed again before the worker starts

    log = (tmp_path / "worker.log").open("w")
    worker = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "deploy.celery_app", "worker", "-Q", "calibrate", "--pool", "prefork",
         "-c", "1", "--loglevel", "INFO", "-n", f"calib-test-{os.getpid()}@%h", "--without-mingle",
         "--without-gossip"],
        cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        ids = [send(settings, "calibration.calibrate_expert", (eid,)) for eid in (good.id, bad.id, good.id)]
        assert all(ids)
        client = _client(settings.broker_url, settings.result_url)
        results = [client.AsyncResult(t).get(timeout=150) for t in ids]
        # the beat's sweep task finds the still-uncalibrated (corrupt) expert and enqueues it again ...
        sweep_id = send(settings, "calibration.sweep_uncalibrated")
        swept = client.AsyncResult(sweep_id).get(timeout=60)
        assert swept["found"] == 1 and swept["enqueued"] == 1 and swept["given_up"] == []
        resweep = client.AsyncResult(swept["task_ids"][0]).get(timeout=60)
        # ... until it failed on its own DIFFGRAPH_CALIB_MAX_ATTEMPTS (2) times: then it is given up, not re-queued
        last = client.AsyncResult(send(settings, "calibration.sweep_uncalibrated")).get(timeout=60)
        assert last["found"] == 0 and last["enqueued"] == 0
        assert [g["expert_id"] for g in last["given_up"]] == [bad.id] and last["given_up"][0]["last_error"]
    finally:
        os.killpg(worker.pid, signal.SIGTERM)
        try:
            worker.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait()
        log.close()
    out = (tmp_path / "worker.log").read_text()
    assert "calibration.calibrate_expert" in out  # the worker process ran it, not this one

    first, failed, rerun = results
    assert first["status"] == "succeeded" and first["n_images"] == 2
    assert failed["status"] == "failed" and failed["error"]
    assert rerun["status"] == "succeeded" and rerun["mean_score"] == pytest.approx(first["mean_score"])

    with store_session(settings) as store:
        caps = store.get_capabilities()
        assert store.get_expert(good.id).calibrated_at is not None
    assert len(caps) == 2 and {c.expert_id for c in caps} == {good.id}  # rerun replaced, did not duplicate
    with session_scope(settings) as s:
        runs = {r.task_id: r for r in s.query(CalibrationRun)}
    assert resweep["expert_id"] == bad.id and resweep["status"] == "failed"
    assert set(runs) == {*ids, swept["task_ids"][0]}
    assert [runs[t].status for t in ids] == ["succeeded", "failed", "succeeded"]
    assert runs[ids[1]].expert_id == bad.id and runs[ids[1]].error
