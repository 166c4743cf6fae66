"""The generation lease on real PostgreSQL: one owner at a time, take-over only after expiry, and a runner
that lost its claim writes nothing more."""

from __future__ import annotations

import threading
import time
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import update

from core.records import GenerationJob, session_scope
from core.settings import Settings
from deploy.lease import Heartbeat, LeaseLost, claim_or_wait, guarded_update, new_owner, renew, try_claim

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def pg(tmp_path: Path, pg_url: str) -> Settings:
    return Settings(data_dir=tmp_path / "var", sql_url=pg_url)


def _claim(settings: Settings, job: str, owner: str, lease_s: float = 30.0) -> bool:
    return try_claim(settings, job, owner, prompt="a fox", params={}, worker=owner.split("#")[0], lease_s=lease_s)


def _row(settings: Settings, job: str) -> GenerationJob:
    with session_scope(settings) as s:
        return s.get(GenerationJob, job)


def _expire(settings: Settings, job: str) -> None:
    with session_scope(settings) as s:
        s.execute(update(GenerationJob).where(GenerationJob.id == job)
                  .values(lease_expires_at=GenerationJob.lease_expires_at - timedelta(hours=1)))


def test_one_owner_until_the_lease_expires_and_the_old_owner_writes_nothing(pg: Settings) -> None:
    a, b = new_owner("w1@x"), new_owner("w2@x")
    assert a.startswith("w1@x#") and a != new_owner("w1@x")
    assert _claim(pg, "job-1", a)
    assert not _claim(pg, "job-1", b)  # live lease: the second delivery does not proceed
    with pytest.raises(LeaseLost):
        guarded_update(pg, "job-1", b, stage="sample")
    guarded_update(pg, "job-1", a, stage="sample")
    assert (_row(pg, "job-1").stage, _row(pg, "job-1").attempts) == ("sample", 1)

    _expire(pg, "job-1")  # a's runner stalled (or died) past its lease
    assert _claim(pg, "job-1", b)
    assert not renew(pg, "job-1", a, 30.0)
    with pytest.raises(LeaseLost):
        guarded_update(pg, "job-1", a, release=True, status="SUCCESS", image_paths=["stale.png"])
    row = _row(pg, "job-1")
    assert (row.lease_owner, row.status, row.image_paths, row.attempts) == (b, "STARTED", None, 2)

    guarded_update(pg, "job-1", b, release=True, status="SUCCESS")
    assert not _claim(pg, "job-1", new_owner("w3@x"))  # a finished job is never claimed again


def test_a_waiting_delivery_returns_once_the_owner_finishes(pg: Settings) -> None:
    a, b = new_owner("w1@x"), new_owner("w2@x")
    assert _claim(pg, "job-2", a, lease_s=2.0)
    outcome: dict[str, bool] = {}
    waiter = threading.Thread(target=lambda: outcome.setdefault("claimed", claim_or_wait(
        pg, "job-2", b, prompt="a fox", params={}, worker="w2@x", lease_s=2.0)))
    with Heartbeat(pg, "job-2", a, 2.0) as lease:
        waiter.start()
        time.sleep(3.0)  # longer than the lease: only the renewals keep it
        lease.check()
        assert waiter.is_alive()
        guarded_update(pg, "job-2", a, release=True, status="SUCCESS")
    waiter.join(timeout=20)
    assert outcome == {"claimed": False} and _row(pg, "job-2").attempts == 1


def test_a_waiting_delivery_takes_over_an_abandoned_lease(pg: Settings) -> None:
    assert _claim(pg, "job-3", new_owner("dead@x"), lease_s=0.5)  # nobody renews it
    b = new_owner("w2@x")
    assert claim_or_wait(pg, "job-3", b, prompt="a fox", params={}, worker="w2@x", lease_s=0.5)
    row = _row(pg, "job-3")
    assert (row.lease_owner, row.attempts) == (b, 2)
