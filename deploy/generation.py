"""One generation job, end to end and exactly once: validate, plan, resolve weights, merge and sample,
store images, and write the SQL ``GenerationJob`` row and the graph's ``:Generation`` node.

The job is keyed by its id (the Celery task id). A redelivered job finds its row: a finished job
returns the stored result without regenerating; an unfinished one redoes the work and overwrites
the same row, the same image files and the same graph node. Bad input fails before anything is written.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from core.settings import Settings
from core.types import (
    MAX_PROMPT_CHARS,
    DiffGraphError,
    Expert,
    ExpertKind,
    GenerationStatus,
    MergePlan,
    NotFoundError,
    ValidationFailed,
    utcnow,
)
from deploy.lease import Heartbeat, LeaseLost, claim_or_wait, guarded_update, new_owner
from deploy.storage import get_storage

log = logging.getLogger(__name__)

MAX_STEPS = 200
MAX_SIZE = 2048
MAX_IMAGES = 8
MAX_ERROR_CHARS = 4000

Progress = Callable[[str, int, int], None]


class GenerateOptions(BaseModel):
    """What a caller may set for one generation; ``None`` means the settings default (``gen_*``)."""

    model_config = ConfigDict(extra="forbid")

    negative_prompt: str = Field(default="", max_length=MAX_PROMPT_CHARS)
    seed: int = Field(default=0, ge=0, le=2**32 - 1)
    steps: int | None = Field(default=None, ge=1, le=MAX_STEPS)
    guidance: float | None = Field(default=None, ge=0.0, le=50.0)
    width: int | None = Field(default=None, ge=8, le=MAX_SIZE)
    height: int | None = Field(default=None, ge=8, le=MAX_SIZE)
    num_images: int = Field(default=1, ge=1, le=MAX_IMAGES)
    method: Literal["vgae", "fixed", "similarity", "direct"] = "vgae"
    plan: MergePlan | None = None  # an explicit plan skips the planner
    scheduler: str | None = Field(default=None, max_length=64)  # diffusers class or A1111 name ("Euler a")
    clip_skip: int | None = Field(default=None, ge=1, le=12)  # A1111 convention

    @field_validator("width", "height")
    @classmethod
    def _multiple_of_8(cls, v: int | None) -> int | None:
        if v is not None and v % 8:
            raise ValueError(f"must be a multiple of 8, got {v}")
        return v

    def resolved(self, settings: Settings) -> dict[str, Any]:
        """The concrete parameters (defaults filled from settings), as stored on the job row."""
        return {
            "negative_prompt": self.negative_prompt,
            "seed": self.seed,
            # None: the plan's family decides (core.families), the size from the base model's own config
            "steps": self.steps if self.steps is not None else (settings.gen_steps or None),
            "guidance": self.guidance if self.guidance is not None else settings.gen_guidance,
            "width": self.width if self.width is not None else (settings.gen_size or None),
            "height": self.height if self.height is not None else (settings.gen_size or None),
            "num_images": self.num_images,
            "method": "explicit" if self.plan is not None else self.method,
            **{k: v for k, v in (("scheduler", self.scheduler), ("clip_skip", self.clip_skip)) if v is not None},
        }


def validate_request(prompt: Any, options: GenerateOptions | dict[str, Any] | None) -> GenerateOptions:
    """Check the prompt and options; raises ``ValidationFailed`` with every problem on one line."""
    if not isinstance(prompt, str):
        raise ValidationFailed(f"prompt must be a string, got {type(prompt).__name__}")
    if not prompt.strip():
        raise ValidationFailed("prompt is empty")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise ValidationFailed(f"prompt is {len(prompt):,} characters long; the limit is {MAX_PROMPT_CHARS:,}")
    if isinstance(options, GenerateOptions):
        return options
    if options is not None and not isinstance(options, dict):
        raise ValidationFailed(f"options must be an object, got {type(options).__name__}")
    try:
        return GenerateOptions.model_validate(options or {})
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'options'}: {err['msg']}" for err in exc.errors()
        )
        raise ValidationFailed(f"invalid generation options: {problems}") from None


def _check_explicit_plan(settings: Settings, plan: MergePlan) -> dict[str, Expert]:
    """An explicit plan may only name registered experts and a configured base (no arbitrary paths);
    returns the named experts."""
    if plan.base_model and plan.base_model not in settings.base_models.values():
        raise ValidationFailed(
            f"plan.base_model {plan.base_model!r} is not a configured base model; leave it empty to use "
            f"the base of family {plan.base_family!r}"
        )
    if not plan.experts:
        return {}
    from graphdb.backends import store_session

    found: dict[str, Expert] = {}
    missing: list[str] = []
    with store_session(settings) as store:
        for pe in plan.experts:
            try:
                found[pe.expert_id] = store.get_expert(pe.expert_id)
            except NotFoundError:
                missing.append(pe.expert_id)
    if missing:
        raise NotFoundError(f"unknown expert id(s) in plan: {', '.join(missing)}")
    from core.families import FamilyError, check_plan_family

    try:  # a plan never mixes families: a Pony LoRA on an Illustrious base is refused here
        check_plan_family(plan.base_family, [(f"{e.name or e.id} ({e.id})", e.base_family) for e in found.values()])
    except FamilyError as exc:
        raise ValidationFailed(str(exc)) from None
    return found


# -- SQL record ---------------------------------------------------------------------------------------


def _result_from_row(row: Any) -> dict[str, Any]:
    return {
        "task_id": row.id,
        "status": row.status,
        "prompt": row.prompt,
        "plan": row.plan,
        "image_paths": list(row.image_paths or []),
        "timings": dict(row.timings or {}),
    }


def finished_result(settings: Settings, job_id: str) -> dict[str, Any] | None:
    """The stored result of job ``job_id`` if it already succeeded, else ``None``."""
    from core.records import GenerationJob, session_scope

    with session_scope(settings) as s:
        row = s.get(GenerationJob, job_id)
        if row is not None and row.status == GenerationStatus.success.value:
            return _result_from_row(row)
    return None


def _mark_failed(settings: Settings, job_id: str, owner: str, error: str, timings: dict[str, float]) -> bool:
    """Mark the row FAILURE (and give the lease up) if ``owner`` still holds it."""
    from deploy.lease import LeaseLost, guarded_update

    try:
        guarded_update(settings, job_id, owner, release=True, status=GenerationStatus.failure.value, error=error,
                       timings=timings, finished_at=utcnow())
    except LeaseLost:
        return False
    return True


def record_killed(settings: Settings, job_id: str, worker: str | None, error: str) -> bool:
    """Record job ``job_id`` as failed after the process running it on ``worker`` was killed (hard time
    limit): nobody else will. A job held by another worker's runner, or finished, is left alone."""
    from sqlalchemy import or_, update

    from core.records import GenerationJob, session_scope

    try:
        with session_scope(settings) as s:
            res = s.execute(
                update(GenerationJob)
                .where(GenerationJob.id == job_id, GenerationJob.status == GenerationStatus.started.value,
                       or_(GenerationJob.lease_owner.is_(None),
                           GenerationJob.lease_owner.startswith(f"{worker or 'local'}#", autoescape=True)))
                .values(status=GenerationStatus.failure.value, error=error[:MAX_ERROR_CHARS], finished_at=utcnow(),
                        lease_owner=None, lease_expires_at=None)
                .execution_options(synchronize_session=False))
            marked = res.rowcount == 1
        if marked:
            get_storage(settings).delete_job(job_id)
        return marked
    except Exception:
        log.exception("cannot mark killed generation %s as failed", job_id)
        return False


def _since(t0: float) -> float:
    return round(time.perf_counter() - t0, 4)


def _error_text(exc: BaseException) -> str:
    text = str(exc) if isinstance(exc, DiffGraphError) else f"{type(exc).__name__}: {exc}"
    return (text.strip() or type(exc).__name__)[:MAX_ERROR_CHARS]


# -- the pipeline ---------------------------------------------------------------------------------------

def _generator(settings: Settings) -> Any:
    """The process's shared ``Generator``, so its pipeline cache survives across jobs (and calibration)."""
    from merger.generate import shared_generator

    return shared_generator(settings)


def _plan(settings: Settings, prompt: str, opts: GenerateOptions) -> MergePlan:
    if opts.plan is not None:
        plan = opts.plan.model_copy(deep=True)
        plan.coefficients = "explicit"
        plan.prompt = plan.prompt or prompt
        return plan
    from planner import make_plan

    return make_plan(settings, prompt, opts.method, opts.seed)


def _resolve_weights(settings: Settings, plan: MergePlan, known: dict[str, Expert]) -> None:
    """Point each planned expert at a local, verified weight file (never a caller-supplied path)."""
    if not plan.experts:
        return
    from crawler.downloads import ensure_local
    from graphdb.backends import store_session

    experts = dict(known)
    if any(pe.expert_id not in experts for pe in plan.experts):
        with store_session(settings) as store:  # short: the embedded graph admits one process at a time
            experts.update({pe.expert_id: store.get_expert(pe.expert_id) for pe in plan.experts})
    for pe in plan.experts:
        path = ensure_local(settings, experts[pe.expert_id])
        pe.path = str(path)
        if pe.kind is not ExpertKind.checkpoint and not pe.trigger_words:  # Civitai "trained words", added to the prompt
            pe.trigger_words = [w[:100] for w in experts[pe.expert_id].trained_words[:8]]
        pe.sha256 = pe.sha256 or (experts[pe.expert_id].primary_file.sha256
                                  if experts[pe.expert_id].primary_file else None)


def _sampler_prompt(prompt: str) -> str:
    """The prompt as the sampler takes it: its text encoder reads at most 77 tokens, and the merger
    bounds prompts more tightly than the 10,000 characters a job may carry, so longer text is cut."""
    from merger.generate import MAX_SAMPLER_PROMPT_CHARS

    return prompt[:MAX_SAMPLER_PROMPT_CHARS]


def _record_graph(settings: Settings, job_id: str, prompt: str, plan: MergePlan) -> None:
    from graphdb.backends import store_session

    used = [(pe.expert_id, float(pe.coefficient)) for pe in plan.experts]
    with store_session(settings) as store:
        store.record_generation(job_id, prompt, used, created_at=utcnow())


def run_generation(
    settings: Settings,
    job_id: str,
    prompt: str,
    options: GenerateOptions | dict[str, Any] | None,
    progress: Progress | None = None,
    *,
    worker: str | None = None,
) -> dict[str, Any]:
    """Run generation job ``job_id`` exactly once and return its JSON-serialisable result.

    Args:
        settings: effective settings (graph, SQL, data dir, base models, generation defaults).
        job_id: the job's key (the Celery task id); letters, digits, ``.``, ``_``, ``-``.
        prompt: the text prompt (1 to 10,000 characters).
        options: a ``GenerateOptions`` or its JSON form.
        progress: ``progress(stage, step, total)``; stages ``plan``, ``resolve``, ``load``, ``merge``,
            ``lora``, ``sample``, ``save``, ``record``.
        worker: the worker's name, stored on the row.

    Returns:
        ``{task_id, status, prompt, plan, image_paths, timings}``.

    Raises:
        ValidationFailed: bad prompt or options (nothing written).
        NotFoundError: an explicit plan names an unknown expert (nothing written).
        DiffGraphError / MergeError: planning or merging failed (row marked FAILURE, no graph record).
    """
    started = time.perf_counter()
    opts = validate_request(prompt, options)
    storage = get_storage(settings)
    storage.uri(job_id, 0)  # validates the job id before anything is written
    done = finished_result(settings, job_id)
    if done is not None:
        log.info("generation %s already finished; returning the stored result", job_id)
        return done
    known = _check_explicit_plan(settings, opts.plan) if opts.plan is not None else {}
    params = opts.resolved(settings)
    owner = new_owner(worker)
    lease_s = settings.generation_lease_s
    if not claim_or_wait(settings, job_id, owner, prompt=prompt, params=params, worker=worker, lease_s=lease_s):
        log.info("generation %s was finished by another runner; returning its result", job_id)
        done = finished_result(settings, job_id)
        assert done is not None
        return done
    with Heartbeat(settings, job_id, owner, lease_s) as lease:
        return _run_claimed(settings, job_id, owner, lease, prompt, opts, params, known, progress, worker, started)


def _run_claimed(settings: Settings, job_id: str, owner: str, lease: Heartbeat, prompt: str, opts: GenerateOptions,
                 params: dict[str, Any], known: dict[str, Expert], progress: Progress | None, worker: str | None,
                 started: float) -> dict[str, Any]:
    """The job's work once ``owner`` holds its lease: every write checks the lease first."""
    storage = get_storage(settings)
    timings: dict[str, float] = {}
    current = {"stage": ""}

    def report(stage: str, step: int, total: int) -> None:
        lease.check()
        if stage != current["stage"]:
            current["stage"] = stage
            guarded_update(settings, job_id, owner, stage=stage)
        if progress is not None:
            progress(stage, step, total)

    try:
        t0 = time.perf_counter()
        report("plan", 0, 1)
        plan = _plan(settings, prompt, opts)
        timings["plan"] = _since(t0)

        t0 = time.perf_counter()
        report("resolve", 0, max(1, len(plan.experts)))
        _resolve_weights(settings, plan, known)
        timings["resolve"] = _since(t0)
        guarded_update(settings, job_id, owner, plan=plan.model_dump(mode="json"))

        result = _generator(settings).generate(
            plan,
            _sampler_prompt(prompt),
            negative_prompt=params["negative_prompt"],
            seed=params["seed"],
            steps=params["steps"],
            guidance=params["guidance"],
            width=params["width"],
            height=params["height"],
            num_images=params["num_images"],
            progress=report,
            scheduler=params.get("scheduler"),
            clip_skip=params.get("clip_skip"),
        )
        timings.update({k: round(float(v), 4) for k, v in result.timings.items()})

        t0 = time.perf_counter()
        report("save", 0, len(result.images))  # checks the lease: a runner that lost it writes no image
        paths = [storage.save_image(job_id, i, img) for i, img in enumerate(result.images)]
        timings["save"] = _since(t0)

        t0 = time.perf_counter()
        report("record", 0, 1)
        _record_graph(settings, job_id, prompt, plan)
        timings["record"] = _since(t0)
        timings["total"] = _since(started)

        lease.check()
        guarded_update(
            settings,
            job_id,
            owner,
            release=True,
            status=GenerationStatus.success.value,
            stage="done",
            plan=plan.model_dump(mode="json"),
            image_paths=paths,
            timings=timings,
            error=None,
            worker=worker,
            finished_at=utcnow(),
        )
    except LeaseLost:
        log.warning("generation %s: lease lost to another runner; stopping without further writes", job_id)
        raise
    except Exception as exc:
        log.warning("generation %s failed: %s", job_id, _error_text(exc))
        try:
            if _mark_failed(settings, job_id, owner, _error_text(exc), timings):
                storage.delete_job(job_id)  # no half-written image set survives a failure
        except Exception:  # the original error matters more than a failed bookkeeping write
            log.exception("cannot mark generation %s as failed", job_id)
        raise
    done = finished_result(settings, job_id)
    assert done is not None
    return done


# -- reading the records (``diffgraph jobs``) ---------------------------------------------------------------


def job_to_dict(row: Any, full: bool = True) -> dict[str, Any]:
    """A ``GenerationJob`` row as JSON-serialisable data (``full=False`` omits plan, params and timings)."""
    out: dict[str, Any] = {
        "id": row.id,
        "status": row.status,
        "stage": row.stage,
        "prompt": row.prompt,
        "attempts": row.attempts,
        "worker": row.worker,
        "image_paths": list(row.image_paths or []),
        "error": row.error,
        "created_at": row.created_at.isoformat() if row.created_at else None,
        "finished_at": row.finished_at.isoformat() if row.finished_at else None,
    }
    if full:
        out.update({"params": row.params, "plan": row.plan, "timings": row.timings})
    return out


def list_jobs(settings: Settings, status: str | None = None, limit: int = 20) -> list[dict[str, Any]]:
    """The most recent generation records, newest first, optionally of one status."""
    from sqlalchemy import select

    from core.records import GenerationJob, session_scope

    if status is not None:
        status = status.upper()
        allowed = {s.value for s in GenerationStatus}
        if status not in allowed:
            raise ValidationFailed(f"unknown status {status!r}; one of {', '.join(sorted(allowed))}")
    if limit < 1:
        raise ValidationFailed(f"limit must be >= 1, got {limit}")
    query = select(GenerationJob).order_by(GenerationJob.created_at.desc(), GenerationJob.id).limit(limit)
    if status is not None:
        query = query.where(GenerationJob.status == status)
    with session_scope(settings) as s:
        return [job_to_dict(row, full=False) for row in s.scalars(query)]


def get_job(settings: Settings, job_id: str) -> dict[str, Any]:
    """One generation record; raises ``NotFoundError`` naming the id."""
    from core.records import GenerationJob, session_scope

    with session_scope(settings) as s:
        row = s.get(GenerationJob, job_id)
        if row is None:
            raise NotFoundError(f"no generation job {job_id!r}")
        return job_to_dict(row)
