"""Calibrate experts: generate on the reference prompts with and without each expert, score, store the gain.

For every reference prompt × seed the base model alone and the base with the expert applied (a checkpoint
swapped in = a one-checkpoint task-arithmetic plan at coefficient 1.0; an adapter at its recommended weight,
else 1.0) generate one image each; every available scorer scores both. Experts are grouped by base family
so one base pipeline (and one set of cached base images) serves the whole group.

Normalisation. For each metric ``m`` the raw gain ``g_m = mean_seeds(score_expert - score_base)`` is kept as
``<m>_gain`` in the edge's metrics, and squashed to ``s_m = 1 / (1 + exp(-g_m / METRIC_SCALES[m]))``: 0.5 means
"as good as the base", the scale is the gain that counts as clearly better (s = 0.73). The edge's ``score``
is the mean of ``s_m`` over the available metrics, so it lies in [0, 1] whatever the scorers.

Base images are cached as PNG under ``<data_dir>/cache/calibration/<key>.png``, keyed by the base weights'
fingerprint, prompt, seed, steps, size, guidance, and the batch the prompt was generated in (batched
sampling draws the noise of a whole batch from one seed, so an image depends on its batch).
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from core.settings import Settings
from core.types import (
    Capability,
    DiffGraphError,
    Expert,
    ExpertKind,
    MergePlan,
    PlannedExpert,
    RefPrompt,
    utcnow,
)

if TYPE_CHECKING:
    from PIL import Image

    from calibration.scorers import Scorer

# Gain that counts as clearly better per metric, in each scorer's own units (see module docstring).
METRIC_SCALES = {"clip": 2.5, "aesthetic": 0.3, "imagereward": 0.5, "hpsv2": 0.01, "pickscore": 0.5,
                 "world-adherence": 0.25, "world-clip": 2.5}
DEFAULT_SCALE = 1.0
BATCH_SIZE = 8  # prompts per generate() call
ProgressFn = Callable[[str, int, int], None]


class CalibrationError(DiffGraphError):
    pass


@dataclass
class CalibrationOutcome:
    expert_id: str
    status: str  # succeeded | failed
    n_prompts: int = 0
    n_images: int = 0
    mean_score: float | None = None
    top_category: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    transient: bool = False  # a retry may succeed (graph busy, network)
    cause: str | None = None  # failed runs: expert | setup | transient (see CAUSES)
    run_id: int | None = None
    duration_s: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


# Why a calibration failed. Only the expert's own failures count towards giving up on it
# (DIFFGRAPH_CALIB_MAX_ATTEMPTS); a missing base model or scorer is fixed by the operator, a busy graph
# or a network error by time.
CAUSE_EXPERT, CAUSE_SETUP, CAUSE_TRANSIENT = "expert", "setup", "transient"


class SetupError(CalibrationError):
    """The deployment cannot calibrate (no base model or scorer), whatever the expert."""


@dataclass(frozen=True)
class CalibrationConfig:
    prompts: tuple[RefPrompt, ...]
    seeds: tuple[int, ...]
    steps: int
    size: int
    guidance: float | None  # None: the family's default
    batch_size: int
    dtype: str = "fp32"  # the base images differ by dtype and device kind, so both key the image cache
    device_kind: str = "cpu"


def _is_transient(exc: BaseException) -> bool:
    from graphdb.store import GraphUnavailable

    return isinstance(exc, GraphUnavailable | ConnectionError | TimeoutError)


def _cause(exc: BaseException) -> str:
    if _is_transient(exc):
        return CAUSE_TRANSIENT
    return CAUSE_SETUP if isinstance(exc, SetupError) else CAUSE_EXPERT


def _squash(metric: str, gain: float) -> float:
    scale = METRIC_SCALES.get(metric, DEFAULT_SCALE)
    return 1.0 / (1.0 + math.exp(-max(-50.0, min(50.0, gain / scale))))


# -- SQL run records ------------------------------------------------------------------------------------
def _start_run(settings: Settings, expert_id: str, task_id: str | None, ref_version: str, scorer_ver: str,
               n_prompts: int) -> int:
    from core.records import CalibrationRun, session_scope

    with session_scope(settings) as s:
        run = CalibrationRun(expert_id=expert_id, task_id=task_id, status="running", ref_set_version=ref_version,
                             scorer_version=scorer_ver, n_prompts=n_prompts, started_at=utcnow())
        s.add(run)
        s.flush()
        return int(run.id)


def _finish_run(settings: Settings, run_id: int, outcome: CalibrationOutcome) -> None:
    from core.records import CalibrationRun, session_scope

    with session_scope(settings) as s:
        run = s.get(CalibrationRun, run_id)
        if run is None:  # the row was removed meanwhile; nothing to update
            return
        run.status = outcome.status
        run.n_images = outcome.n_images
        run.metrics = outcome.metrics or None
        run.error = outcome.error
        run.cause = outcome.cause if outcome.status == "failed" else None
        run.finished_at = utcnow()
        run.duration_s = outcome.duration_s


def fail_running_runs(settings: Settings, task_id: str, error: str) -> int:
    """Mark task ``task_id``'s runs that are still ``running`` as failed (its process was killed)."""
    from sqlalchemy import update

    from core.records import CalibrationRun, session_scope

    with session_scope(settings) as s:
        res = s.execute(update(CalibrationRun)
                        .where(CalibrationRun.task_id == task_id, CalibrationRun.status == "running")
                        .values(status="failed", error=error, cause=CAUSE_EXPERT, finished_at=utcnow()))
        return int(res.rowcount or 0)


def given_up(settings: Settings, ref_version: str) -> dict[str, dict[str, Any]]:
    """Experts that failed on their own ``calib_max_attempts`` times for reference set ``ref_version``:
    ``{expert_id: {"failures", "last_error"}}``. Sweeps and ``--pending`` no longer queue them."""
    from sqlalchemy import func, select

    from core.records import CalibrationRun, session_scope

    with session_scope(settings) as s:
        counted = s.execute(
            select(CalibrationRun.expert_id, func.count(), func.max(CalibrationRun.id))
            .where(CalibrationRun.status == "failed", CalibrationRun.cause == CAUSE_EXPERT,
                   CalibrationRun.ref_set_version == ref_version)
            .group_by(CalibrationRun.expert_id)
            .having(func.count() >= settings.calib_max_attempts)
        ).all()
        if not counted:
            return {}
        errors = dict(s.execute(select(CalibrationRun.id, CalibrationRun.error)
                                .where(CalibrationRun.id.in_([last for _, _, last in counted]))).all())
    return {eid: {"failures": int(n), "last_error": errors.get(last)} for eid, n, last in counted}


def pending_experts(settings: Settings, limit: int) -> tuple[list[str], dict[str, dict[str, Any]]]:
    """Experts to calibrate for the current reference set (at most ``limit``), and those given up on."""
    from calibration.refset import load_reference_set
    from graphdb.store import ExpertFilter, store_session

    version = load_reference_set().version
    skipped = given_up(settings, version)
    with store_session(settings) as store:
        found = [e.id for e in store.find_experts(ExpertFilter(uncalibrated_for=version), limit=limit + len(skipped))]
    return [eid for eid in found if eid not in skipped][:limit], {k: v for k, v in skipped.items() if k in found}


# -- base image cache ------------------------------------------------------------------------------------
def _fingerprint(path: Path) -> str:
    """Identity of base weights: resolved path plus size/mtime of its files (cheap, changes on rewrite)."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    h = hashlib.sha256(str(path.resolve()).encode())
    for f in files:
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()


def _cache_key(base_fp: str, prompt: str, seed: int, cfg: CalibrationConfig, batch: Sequence[str]) -> str:
    payload = json.dumps([base_fp, prompt, seed, cfg.steps, cfg.size, cfg.guidance, list(batch), cfg.dtype,
                          cfg.device_kind])
    return hashlib.sha256(payload.encode()).hexdigest()[:32]


def _batches(cfg: CalibrationConfig) -> list[tuple[int, list[RefPrompt]]]:
    """(seed, prompts) jobs: all prompts for each seed, in chunks of ``batch_size``."""
    step = max(1, cfg.batch_size)
    prompts = list(cfg.prompts)
    return [(seed, prompts[i:i + step]) for seed in cfg.seeds for i in range(0, len(prompts), step)]


def _generator(settings: Settings) -> Any:
    """The process's shared ``Generator``: a worker keeps its base pipeline between tasks."""
    from merger.generate import shared_generator

    return shared_generator(settings)


class _Sampler:
    """Thin wrapper over ``merger.generate.Generator`` producing images per (prompt id, seed)."""

    def __init__(self, settings: Settings, cfg: CalibrationConfig, progress: ProgressFn | None) -> None:
        self.generator = _generator(settings)
        self.cfg = cfg
        self.progress = progress
        self.cache_dir = settings.data_dir / "cache" / "calibration"

    def _run(self, plan: MergePlan, seed: int, batch: list[RefPrompt]) -> list[Image.Image]:
        texts = [p.text for p in batch]
        result = self.generator.generate(plan, texts if len(texts) > 1 else texts[0], seed=seed,
                                         steps=self.cfg.steps or None, guidance=self.cfg.guidance,
                                         width=self.cfg.size or None, height=self.cfg.size or None,
                                         num_images=1)
        if len(result.images) != len(batch):
            raise CalibrationError(f"generator returned {len(result.images)} images for {len(batch)} prompts")
        return list(result.images)

    def images(self, label: str, plan: MergePlan, base_fp: str | None = None
               ) -> dict[tuple[str, int], Image.Image]:
        """Images of ``plan`` for every (prompt id, seed); cached on disk when ``base_fp`` is given."""
        from PIL import Image

        jobs = _batches(self.cfg)
        total = len(self.cfg.prompts) * len(self.cfg.seeds)
        out: dict[tuple[str, int], Image.Image] = {}
        for seed, batch in jobs:
            texts = [p.text for p in batch]
            paths = ([self.cache_dir / f"{_cache_key(base_fp, p.text, seed, self.cfg, texts)}.png" for p in batch]
                     if base_fp else [])
            if paths and all(p.is_file() for p in paths):
                imgs = []
                for p in paths:
                    with Image.open(p) as im:
                        imgs.append(im.convert("RGB"))
            else:
                imgs = self._run(plan, seed, batch)
                if paths:
                    self.cache_dir.mkdir(parents=True, exist_ok=True)
                    for img, path in zip(imgs, paths, strict=True):
                        tmp = path.with_suffix(".tmp.png")
                        img.save(tmp)
                        tmp.replace(path)  # atomic: a concurrent reader never sees half a PNG
            for p, img in zip(batch, imgs, strict=True):
                out[(p.id, seed)] = img.convert("RGB")
            if self.progress:
                self.progress(label, len(out), total)
        return out


def _score_all(scorers: dict[str, Scorer], images: dict[tuple[str, int], Image.Image],
               prompts: dict[str, RefPrompt]) -> dict[str, dict[tuple[str, int], float]]:
    keys = list(images)
    imgs = [images[k] for k in keys]
    texts = [prompts[k[0]].text for k in keys]
    out: dict[str, dict[tuple[str, int], float]] = {}
    for name, scorer in scorers.items():
        vals: list[float] = []
        for i in range(0, len(keys), 32):
            vals.extend(scorer.score(imgs[i:i + 32], texts[i:i + 32]))
        out[name] = dict(zip(keys, vals, strict=True))
    return out


def plan_for(expert: Expert, path: Path, base_family: str, base_model: str) -> MergePlan:
    """The plan that applies exactly this expert to the base."""
    planned = PlannedExpert(
        expert_id=expert.id, name=expert.name, kind=expert.kind, path=str(path),
        sha256=expert.primary_file.sha256 if expert.primary_file else None,
        coefficient=1.0 if not expert.kind.is_adapter else float(expert.recommended_weight or 1.0),
        reason="calibration",
    )
    common = {"prompt": "", "base_family": base_family, "base_model": base_model, "coefficients": "explicit",
              "merge_method": "task_arithmetic"}
    if expert.kind is ExpertKind.embedding:
        return MergePlan(**common, embeddings=[planned])
    if expert.kind.is_adapter:
        return MergePlan(**common, loras=[planned])
    return MergePlan(**common, checkpoints=[planned])


def capabilities_for(expert_id: str, cfg: CalibrationConfig, ref_version: str,
                     base_scores: dict[str, dict[tuple[str, int], float]],
                     expert_scores: dict[str, dict[tuple[str, int], float]],
                     calibrated_at: Any) -> list[Capability]:
    """One CAPABILITY per reference prompt: raw ``<metric>_gain`` per metric and the squashed mean ``score``."""
    caps = []
    for p in cfg.prompts:
        metrics: dict[str, float] = {}
        squashed = []
        for m in sorted(expert_scores):
            gains = [expert_scores[m][(p.id, s)] - base_scores[m][(p.id, s)] for s in cfg.seeds]
            gain = sum(gains) / len(gains)
            metrics[f"{m}_gain"] = round(gain, 6)
            squashed.append(_squash(m, gain))
        caps.append(Capability(expert_id=expert_id, prompt_id=p.id, score=round(sum(squashed) / len(squashed), 6),
                               metrics=metrics, n_images=len(cfg.seeds), calibrated_at=calibrated_at,
                               ref_set_version=ref_version))
    return caps


def _summary(caps: list[Capability], prompts: dict[str, RefPrompt]) -> dict[str, Any]:
    by_cat: dict[str, list[float]] = {}
    for c in caps:
        by_cat.setdefault(prompts[c.prompt_id].category, []).append(c.score)
    per_cat = {k: round(sum(v) / len(v), 6) for k, v in sorted(by_cat.items())}
    gains: dict[str, list[float]] = {}
    for c in caps:
        for k, v in c.metrics.items():
            gains.setdefault(k, []).append(v)
    return {
        "mean_score": round(sum(c.score for c in caps) / len(caps), 6),
        "top_category": max(per_cat, key=lambda k: per_cat[k]),
        "per_category": per_cat,
        **{f"mean_{k}": round(sum(v) / len(v), 6) for k, v in sorted(gains.items())},
    }


def calibrate_experts(
    settings: Settings,
    expert_ids: list[str],
    n_prompts: int | None = None,
    n_seeds: int | None = None,
    progress: ProgressFn | None = None,
    task_id: str | None = None,
    batch_size: int = BATCH_SIZE,
) -> list[CalibrationOutcome]:
    """Calibrate ``expert_ids`` and return one outcome per expert, in order.

    Owns: the ``:RefPrompt`` nodes (ensured), the base image cache, one ``CalibrationRun`` row per expert
    (running → succeeded/failed), the CAPABILITY edges and the experts' calibration marks. One bad expert
    (unknown id, missing/corrupt file, incompatible shapes, no base for its family) becomes a failed
    outcome and run; it never stops the others; with no scorer available every expert fails with the
    scorers' reasons. Raises ``GraphUnavailable`` only when the graph cannot be opened at the start.
    """
    from calibration.refset import ensure_ref_prompts, reference_set_for
    from calibration.scorers import Unavailable, available_scorers, scorer_version
    from graphdb.backends import store_session

    refset = reference_set_for(settings)
    n = n_prompts if n_prompts is not None else (settings.calib_prompts or None)
    cfg = CalibrationConfig(
        prompts=tuple(refset.subset(n)), seeds=tuple(range(max(1, n_seeds or settings.calib_seeds))),
        steps=settings.calib_steps, size=settings.calib_size, guidance=settings.gen_guidance, batch_size=batch_size,
        dtype=settings.resolved_dtype(), device_kind=settings.resolved_device().split(":")[0],
    )
    all_scorers = available_scorers(settings)
    scorers: dict[str, Scorer] = {k: v for k, v in all_scorers.items() if not isinstance(v, Unavailable)}
    unavailable = {k: v.reason for k, v in all_scorers.items() if isinstance(v, Unavailable)}
    scorer_ver = scorer_version(all_scorers)
    prompts_by_id = {p.id: p for p in cfg.prompts}

    outcomes: dict[str, CalibrationOutcome] = {}
    experts: dict[str, Expert] = {}
    with store_session(settings) as store:
        ensure_ref_prompts(settings, store, refset)
        for eid in dict.fromkeys(expert_ids):
            try:
                experts[eid] = store.get_expert(eid)
            except DiffGraphError as exc:
                outcomes[eid] = CalibrationOutcome(eid, "failed", error=str(exc), transient=_is_transient(exc),
                                                   cause=_cause(exc))

    t0 = time.perf_counter()
    runs = {eid: _start_run(settings, eid, task_id, refset.version, scorer_ver, len(cfg.prompts))
            for eid in dict.fromkeys(expert_ids)}

    def finish(out: CalibrationOutcome) -> None:
        """Close the expert's run row as soon as its outcome is known (the batch may go on for a while)."""
        out.run_id = runs[out.expert_id]
        out.duration_s = round(time.perf_counter() - t0, 3)
        outcomes[out.expert_id] = out
        _finish_run(settings, runs[out.expert_id], out)

    def fail(eid: str, exc: BaseException) -> None:
        msg = str(exc) if isinstance(exc, DiffGraphError) else f"{type(exc).__name__}: {exc}"
        finish(CalibrationOutcome(eid, "failed", n_prompts=len(cfg.prompts), error=msg[:4000],
                                  transient=_is_transient(exc), cause=_cause(exc)))

    for out in list(outcomes.values()):  # unknown experts found above
        finish(out)
    if not scorers:  # a deployment problem, but recorded per expert like any other failure
        no_scorer = SetupError("no scorer available: " + "; ".join(f"{k}: {r}" for k, r in unavailable.items()))
        for eid in experts:
            fail(eid, no_scorer)
        return [outcomes[eid] for eid in dict.fromkeys(expert_ids)]

    # resolve weights, then group by base family
    paths: dict[str, Path] = {}
    groups: dict[str, list[Expert]] = {}
    for eid, expert in experts.items():
        try:
            from crawler.downloads import ensure_local

            paths[eid] = Path(ensure_local(settings, expert))
            groups.setdefault(expert.base_family, []).append(expert)
        except Exception as exc:  # missing file, hash mismatch, refused pickle, network...
            fail(eid, exc)

    sampler: _Sampler | None = None
    for family, group in groups.items():
        base = settings.base_models.get(family, "")
        try:
            if not base:
                raise SetupError(f"no base model configured for family {family!r} (set base_models)")
            if not Path(base).exists():
                raise SetupError(f"base model for {family!r} not found at {base}")
            base_plan = MergePlan(prompt="", base_family=family, base_model=base, coefficients="explicit")
            sampler = sampler or _Sampler(settings, cfg, progress)
            base_images = sampler.images(f"base {family}", base_plan, base_fp=_fingerprint(Path(base)))
            base_scores = _score_all(scorers, base_images, prompts_by_id)
        except Exception as exc:  # the base itself failed: no expert of the family is to blame
            setup = exc if isinstance(exc, SetupError) or _is_transient(exc) else SetupError(
                f"base images for {family!r} failed: {type(exc).__name__}: {exc}")
            for expert in group:
                fail(expert.id, setup)
            continue
        for expert in group:
            try:
                images = sampler.images(expert.id, plan_for(expert, paths[expert.id], family, base))
                expert_scores = _score_all(scorers, images, prompts_by_id)
                now = utcnow()
                caps = capabilities_for(expert.id, cfg, refset.version, base_scores, expert_scores, now)
                with store_session(settings) as store:
                    store.write_capabilities(caps)
                    store.mark_calibrated(expert.id, refset.version, scorer_ver, now)
                summary = _summary(caps, prompts_by_id)
                if unavailable:
                    summary["unavailable_scorers"] = unavailable
                finish(CalibrationOutcome(
                    expert.id, "succeeded", n_prompts=len(cfg.prompts), n_images=len(images),
                    mean_score=summary["mean_score"], top_category=summary["top_category"], metrics=summary,
                ))
            except Exception as exc:
                fail(expert.id, exc)

    return [outcomes[eid] for eid in dict.fromkeys(expert_ids)]
