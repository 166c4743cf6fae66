"""The Celery app's reliability options, retry classification and image storage (no worker needed)."""

from __future__ import annotations

import sqlalchemy.exc
from PIL import Image

from core.queue import TASK_QUEUES
from core.settings import Settings
from core.types import NotFoundError, ValidationFailed
from deploy.celery_app import (
    DEFAULT_VISIBILITY_TIMEOUT_S,
    HARD_TIME_LIMIT_S,
    is_transient,
    make_app,
    retry_countdown,
)
from deploy.storage import LocalStorage, Storage, get_storage
from graphdb.store import GraphUnavailable


def test_app_is_reliable_by_construction(settings: Settings) -> None:
    app = make_app(settings.model_copy(update={"broker_url": "redis://127.0.0.1:6379/13",
                                               "result_url": "redis://127.0.0.1:6379/13"}))
    conf = app.conf
    assert conf.task_acks_late and conf.task_reject_on_worker_lost
    assert conf.worker_prefetch_multiplier == 1
    # leases make a redelivered copy wait for the running one, which is kept (deploy.lease)
    assert conf.worker_cancel_long_running_tasks_on_connection_loss is False
    assert conf.accept_content == ["json"] and conf.task_serializer == "json"
    assert conf.task_always_eager is False
    assert conf.task_publish_retry is True and conf.broker_connection_max_retries is None
    opts = conf.broker_transport_options
    # a healthy long task must never be redelivered while it still runs
    assert opts["visibility_timeout"] == DEFAULT_VISIBILITY_TIMEOUT_S > HARD_TIME_LIMIT_S
    for name, queue in TASK_QUEUES.items():
        assert conf.task_routes[name] == {"queue": queue}
    assert {q.name for q in conf.task_queues} == {"ingest", "calibrate", "generate"}


def test_visibility_timeout_env_override(settings: Settings, monkeypatch) -> None:
    monkeypatch.setenv("DIFFGRAPH_VISIBILITY_TIMEOUT_S", "6")
    opts = make_app(Settings()).conf.broker_transport_options
    assert opts["visibility_timeout"] == 6
    assert opts["unacked_restore_interval"] == 1 and opts["unacked_restore_throttle"] == 1


def test_without_broker_tasks_run_eagerly(settings: Settings) -> None:
    assert make_app(settings).conf.task_always_eager is True


def test_only_transient_errors_are_retried() -> None:
    assert is_transient(GraphUnavailable("graph locked"))
    assert is_transient(RuntimeError("IO exception: Could not set lock on file : /x/graph"))
    assert is_transient(sqlalchemy.exc.OperationalError("SELECT 1", {}, Exception("connection refused")))
    import redis.exceptions

    assert is_transient(redis.exceptions.ConnectionError("down"))
    assert not is_transient(ValidationFailed("prompt is empty"))
    assert not is_transient(NotFoundError("unknown expert"))
    from merger.errors import CorruptWeights

    assert not is_transient(CorruptWeights("bad header"))
    assert not is_transient(ValueError("bug"))


def test_retry_backoff_grows_and_is_capped() -> None:
    for retries in range(8):
        delay = retry_countdown(retries, base=2.0, cap=60.0)
        ceiling = min(60.0, 2.0 * 2**retries)
        assert ceiling / 2 <= delay <= ceiling


def test_local_storage_deterministic_atomic_paths(tmp_path) -> None:
    store = LocalStorage(tmp_path)
    assert isinstance(store, Storage)
    img = Image.new("RGB", (8, 8), (255, 0, 0))
    p0 = store.save_image("job-1", 0, img)
    p1 = store.save_image("job-1", 1, img)
    assert p0 == str(tmp_path.resolve() / "images" / "job-1" / "0.png")
    # a redelivered job overwrites the same files, never adds new ones
    again = store.save_image("job-1", 0, Image.new("RGB", (8, 8), (0, 0, 255)))
    assert again == p0
    assert store.list_images("job-1") == [p0, p1]
    assert Image.open(p0).getpixel((0, 0)) == (0, 0, 255)
    assert not [p for p in (tmp_path / "images" / "job-1").iterdir() if p.suffix == ".tmp"]
    store.delete_job("job-1")
    assert store.list_images("job-1") == []


def test_storage_rejects_path_tricks(tmp_path) -> None:
    store = LocalStorage(tmp_path)
    for bad in ("../evil", "a/b", "", ".hidden", "x" * 300):
        try:
            store.uri(bad, 0)
        except ValidationFailed:
            continue
        raise AssertionError(f"accepted job id {bad!r}")


def test_get_storage_is_under_data_dir(settings: Settings) -> None:
    uri = get_storage(settings).uri("abc", 2)
    assert uri.endswith("images/abc/2.png") and uri.startswith(str(settings.data_dir.resolve()))


def test_generate_task_contract(settings: Settings) -> None:
    from deploy.tasks import generate

    app = make_app(settings)
    assert generate.name == "deploy.generate" and generate.name in app.tasks
    assert generate.acks_late is True and generate.reject_on_worker_lost is True
    assert app.conf.task_routes["deploy.generate"] == {"queue": "generate"}
