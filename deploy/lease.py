"""The lease on a generation job: exactly one runner proceeds, even when its task is delivered twice.

Celery redelivers an unacknowledged message after the broker's visibility timeout (or a lost connection),
possibly while the first delivery is still running. The job's SQL row therefore carries an owner
(``<worker>#<token>``, one token per run) and a lease expiry:

* ``try_claim`` takes the row in one conditional ``UPDATE`` (no owner, an expired lease, or already ours;
  never a finished job), so two runners cannot both succeed;
* the owner renews the lease every quarter of ``DIFFGRAPH_GENERATION_LEASE_S`` from a thread
  (``Heartbeat``); a runner that could not renew in time, or finds another owner, has lost the job and
  writes nothing more (``LeaseLost``);
* another delivery waits (``claim_or_wait``) while the lease is live and takes over only once it expired
  (its runner died without releasing it); a job finished meanwhile is returned, not run again.

Every write of a runner goes through ``guarded_update``, which checks ownership in the same statement.
Expiry times come from the workers' clocks (UTC), which must agree to well within the lease.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from datetime import timedelta
from typing import Any

from core.settings import Settings
from core.types import DiffGraphError, GenerationStatus, utcnow

log = logging.getLogger(__name__)

FINISHED = (GenerationStatus.success.value,)


class LeaseLost(DiffGraphError):
    """Another runner took this generation job over (this runner's lease expired)."""


class FailedElsewhere(DiffGraphError):
    """The runner this delivery waited for failed the job; its error is this one's."""


def new_owner(worker: str | None) -> str:
    """A lease owner for one run on ``worker``: ``<worker>#<token>``."""
    return f"{worker or 'local'}#{uuid.uuid4().hex[:12]}"


def _ensure_row(settings: Settings, job_id: str, prompt: str, params: dict[str, Any]) -> None:
    from sqlalchemy.exc import IntegrityError

    from core.records import GenerationJob, session_scope

    try:
        with session_scope(settings) as s:
            if s.get(GenerationJob, job_id) is None:
                s.add(GenerationJob(id=job_id, prompt=prompt, params=params, status=GenerationStatus.pending.value,
                                    attempts=0))
    except IntegrityError:  # another delivery inserted it first; the claim below decides
        pass


def try_claim(settings: Settings, job_id: str, owner: str, *, prompt: str, params: dict[str, Any],
              worker: str | None, lease_s: float) -> bool:
    """Take job ``job_id`` for ``owner`` unless another runner holds a live lease or it already succeeded."""
    from sqlalchemy import or_, update

    from core.records import GenerationJob, session_scope

    _ensure_row(settings, job_id, prompt, params)
    now = utcnow()
    with session_scope(settings) as s:
        res = s.execute(
            update(GenerationJob)
            .where(GenerationJob.id == job_id, GenerationJob.status.not_in(FINISHED),
                   or_(GenerationJob.lease_owner.is_(None), GenerationJob.lease_expires_at < now,
                       GenerationJob.lease_owner == owner))
            .values(lease_owner=owner, lease_expires_at=now + timedelta(seconds=lease_s), prompt=prompt,
                    params=params, status=GenerationStatus.started.value, stage="queued", error=None,
                    finished_at=None, attempts=GenerationJob.attempts + 1, worker=worker, updated_at=now)
            .execution_options(synchronize_session=False)
        )
        return res.rowcount == 1


def renew(settings: Settings, job_id: str, owner: str, lease_s: float) -> bool:
    """Extend ``owner``'s lease; ``False`` when it is no longer the owner."""
    from sqlalchemy import update

    from core.records import GenerationJob, session_scope

    with session_scope(settings) as s:
        res = s.execute(update(GenerationJob)
                        .where(GenerationJob.id == job_id, GenerationJob.lease_owner == owner)
                        .values(lease_expires_at=utcnow() + timedelta(seconds=lease_s))
                        .execution_options(synchronize_session=False))
        return res.rowcount == 1


def guarded_update(settings: Settings, job_id: str, owner: str, *, release: bool = False, **fields: Any) -> None:
    """Write ``fields`` to the job's row if ``owner`` still holds it (``release`` gives the lease up);
    raises ``LeaseLost`` otherwise, having written nothing."""
    from sqlalchemy import update

    from core.records import GenerationJob, session_scope

    values = dict(fields, updated_at=utcnow())
    if release:
        values.update(lease_owner=None, lease_expires_at=None)
    with session_scope(settings) as s:
        res = s.execute(update(GenerationJob)
                        .where(GenerationJob.id == job_id, GenerationJob.lease_owner == owner)
                        .values(**values)
                        .execution_options(synchronize_session=False))
        if res.rowcount != 1:
            raise LeaseLost(f"generation {job_id}: another runner took the job over; this one stops")


def _poll_s(lease_s: float) -> float:
    return min(5.0, max(0.2, lease_s / 4))


def claim_or_wait(settings: Settings, job_id: str, owner: str, *, prompt: str, params: dict[str, Any],
                  worker: str | None, lease_s: float) -> bool:
    """Claim the job, waiting while another runner holds a live lease. ``True``: this runner owns it;
    ``False``: the job succeeded meanwhile (read its result). Raises ``FailedElsewhere`` when the runner
    waited for failed it."""
    from core.records import GenerationJob, session_scope

    waited = False
    while True:
        with session_scope(settings) as s:
            row = s.get(GenerationJob, job_id)
            status, holder, error = (row.status, row.lease_owner, row.error) if row is not None else (None, None, None)
        if status in FINISHED:
            return False
        if waited and status == GenerationStatus.failure.value and holder is None:
            raise FailedElsewhere(error or f"generation {job_id} failed")
        if try_claim(settings, job_id, owner, prompt=prompt, params=params, worker=worker, lease_s=lease_s):
            return True
        if not waited:
            log.info("generation %s is held by another runner; waiting for it to finish or its lease to expire",
                     job_id)
        waited = True
        time.sleep(_poll_s(lease_s))


class Heartbeat:
    """Renews ``owner``'s lease from a daemon thread; ``check()`` raises ``LeaseLost`` once it is lost
    (taken over, or not renewed before it expired, e.g. while the database was unreachable)."""

    def __init__(self, settings: Settings, job_id: str, owner: str, lease_s: float) -> None:
        self.settings, self.job_id, self.owner, self.lease_s = settings, job_id, owner, lease_s
        self.lost = False
        self._stop = threading.Event()
        self._expires = time.monotonic() + lease_s
        self._thread = threading.Thread(target=self._run, name=f"lease-{job_id[:12]}", daemon=True)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(self.lease_s / 4):
            started = time.monotonic()
            try:
                if not renew(self.settings, self.job_id, self.owner, self.lease_s):
                    self.lost = True
                    return
                self._expires = started + self.lease_s
            except Exception as exc:  # the database may come back before the lease runs out
                log.warning("generation %s: cannot renew its lease: %s", self.job_id, exc)
            if time.monotonic() >= self._expires:
                self.lost = True
                return

    def check(self) -> None:
        if self.lost or time.monotonic() >= self._expires:
            self.lost = True
            raise LeaseLost(f"generation {self.job_id}: its lease was lost; this runner stops")
