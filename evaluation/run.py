"""One evaluation run: plan every (method, prompt), sample, score, and keep everything resumable.

Layout of the output directory::

    run.json              the sampling settings (a rerun with different ones is refused)
    scores.jsonl          one line per image: method, set, prompt index, prompt, seed, image, scores
    images/<method>/<set>/<prompt index>-<seed>.png
    swarms.json           the swarms search result (reused by reruns)
    index.html            the table and per-method image grids

A rerun skips images that exist and have every requested score, scores saved images that lack a newly
requested metric, and samples the rest. Prompts whose plans are identical are sampled in one batch, each
image with its own seed (so an image never depends on its batch), and checkpoint merges are cached by
recipe (:func:`merger.merge.cached_merge`), so a rerun of a finished method costs nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.settings import Settings
from core.types import DiffGraphError, MergePlan, ValidationFailed
from evaluation.methods import METHODS, EvalContext, check_methods
from evaluation.metrics import MetricScorer, Unavailable, check_metrics, load_metrics
from evaluation.prompts import PromptSet, load_prompt_set

BATCH = 8  # images per generate() call
CALIBRATION_PROMPTS_FOR_SWARMS = 4
Progress = Callable[[str, int, int], None]


@dataclass
class EvalConfig:
    prompt_sets: list[str]
    methods: list[str]
    metrics: list[str]
    seeds: int = 1
    steps: int = 0  # 0: the base family's steps (core.families)
    size: int = 0  # 0: the base model's native resolution
    guidance: float | None = None  # None: the family's guidance
    out_dir: Path = Path("eval")
    limit: int | None = None
    swarm_budget: int = 12


@dataclass
class EvalRun:
    config: EvalConfig
    sets: list[PromptSet]
    records: dict[tuple[str, str, int, int], dict[str, Any]]
    unavailable: dict[str, str] = field(default_factory=dict)
    notes: dict[str, list[str]] = field(default_factory=dict)


def slug(name: str) -> str:
    """A directory name for a prompt set (a file path becomes its stem plus a short hash)."""
    clean = re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_.")[-40:]
    return clean if clean == name else f"{clean}-{hashlib.sha256(name.encode()).hexdigest()[:6]}"


def prepare(settings: Settings, cfg: EvalConfig) -> tuple[list[PromptSet], dict[tuple[str, bool], Any]]:
    """Every check that can fail before work starts: methods, metrics, prompt sets, scorers, base model."""
    cfg.methods = check_methods(cfg.methods)
    cfg.metrics = check_metrics(cfg.metrics)
    if cfg.seeds < 1 or cfg.steps < 0 or cfg.size < 0 or cfg.size % 8:
        raise ValidationFailed("--seeds and --steps must be ≥ 1 and --size a positive multiple of 8")
    sets = [load_prompt_set(spec, cfg.limit) for spec in dict.fromkeys(cfg.prompt_sets)]
    if not sets:
        raise ValidationFailed("no prompt set given (--prompts FILE|diffusiondb|partiprompts|world:<name>)")
    scorers = load_metrics(settings, cfg.metrics, world=any(s.is_world for s in sets),
                           standard=any(not s.is_world for s in sets))
    family = "sd15"
    if not settings.base_models.get(family):
        raise ValidationFailed(f"no base model configured for {family} (set DIFFGRAPH_BASE_MODELS)")
    _check_run_file(cfg, settings.base_models[family])
    return sets, scorers


def _run_identity(cfg: EvalConfig, base: str) -> dict[str, Any]:
    return {"steps": cfg.steps, "size": cfg.size, "guidance": cfg.guidance, "base": str(base)}


def _check_run_file(cfg: EvalConfig, base: str) -> None:
    path = cfg.out_dir / "run.json"
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved != _run_identity(cfg, base):
            raise ValidationFailed(f"{cfg.out_dir} holds a run with other settings ({saved}); use another --out")


def read_records(path: Path) -> dict[tuple[str, str, int, int], dict[str, Any]]:
    """The scores file as {(method, set, prompt index, seed): record}; later lines win, a torn last line
    (an interrupted write) is ignored."""
    out: dict[tuple[str, str, int, int], dict[str, Any]] = {}
    if not path.is_file():
        return out
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            r = json.loads(line)
            out[(r["method"], r["set"], int(r["index"]), int(r["seed"]))] = r
        except (ValueError, KeyError, TypeError):
            continue
    return out


class _Writer:
    def __init__(self, path: Path) -> None:
        self.path = path

    def append(self, records: list[dict[str, Any]]) -> None:
        with self.path.open("a", encoding="utf-8") as fh:
            for r in records:
                fh.write(json.dumps(r, ensure_ascii=False) + "\n")
            fh.flush()
            os.fsync(fh.fileno())


def _recipe(plan: MergePlan) -> str:
    data = plan.model_dump(mode="json", include={"base_model", "base_family", "merge_method", "density", "seed"})
    data["experts"] = [(e.kind, e.path, e.coefficient) for e in plan.experts]
    return json.dumps(data, sort_keys=True, default=str)


def run_eval(settings: Settings, cfg: EvalConfig, progress: Progress | None = None) -> EvalRun:
    """Run (or resume) the evaluation described by ``cfg``; see the module docstring."""
    sets, scorers = prepare(settings, cfg)
    family = "sd15"
    base = settings.base_models[family]
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    (cfg.out_dir / "run.json").write_text(json.dumps(_run_identity(cfg, base)))
    scores_path = cfg.out_dir / "scores.jsonl"
    records = read_records(scores_path)
    writer = _Writer(scores_path)
    run = EvalRun(cfg, sets, records, {m: s.reason for (m, _), s in scorers.items() if isinstance(s, Unavailable)})

    def usable(is_world: bool) -> dict[str, MetricScorer]:
        return {m: s for (m, w), s in scorers.items() if w == is_world and isinstance(s, MetricScorer)}

    # 1. rescore saved images that lack a requested metric (a metric added to an earlier run)
    _rescore(cfg, sets, records, usable, writer)

    # 2. what is left to sample, per method (a vgae image made by an older planner checkpoint is stale)
    seeds = list(range(cfg.seeds))
    versions = {m: planner_version(settings, m) for m in cfg.methods}
    pending: dict[str, list[tuple[PromptSet, int]]] = {}
    for method in cfg.methods:
        for ps in sets:
            for i in range(len(ps.prompts)):
                if any(not _have(records, method, ps, i, s, versions[method]) for s in seeds):
                    pending.setdefault(method, []).append((ps, i))
    if not pending:
        return run

    from merger.generate import Generator

    generator = Generator(settings)
    ctx = EvalContext(settings, family, base, cfg.out_dir, steps=cfg.steps, size=cfg.size,
                      swarm_budget=cfg.swarm_budget, generator=generator)
    methods = {name: METHODS[name]() for name in pending}
    _load_checkpoints(ctx, methods)
    if "swarms" in methods:
        from calibration.refset import load_reference_set

        world_sets = [s for s in sets if s.is_world]
        if world_sets:
            from evaluation.prompts import world_module

            ctx.calibration_prompts = list(world_module("prompts").load_set("calibration"))[
                :CALIBRATION_PROMPTS_FOR_SWARMS]
        else:
            ctx.calibration_prompts = [p.text for p in load_reference_set().subset(CALIBRATION_PROMPTS_FOR_SWARMS)]
        avail = usable(bool(world_sets))
        first = next((avail[m] for m in cfg.metrics if m in avail), None)
        ctx.utility = None if first is None else _named(first)
        methods["swarms"].prepare(ctx)

    plans = _make_plans(ctx, methods, pending)
    run.notes = ctx.notes

    for method, items in pending.items():
        groups: dict[str, list[tuple[PromptSet, int]]] = {}
        for ps, i in items:
            groups.setdefault(_recipe(plans[(method, ps.name, i)]), []).append((ps, i))
        total = len(items) * len(seeds)
        done = 0
        if progress:
            progress(method, 0, total)
        for group in groups.values():
            jobs = [(ps, i, s) for ps, i in group for s in seeds
                    if not _have(records, method, ps, i, s, versions[method])]
            for start in range(0, len(jobs), BATCH):
                batch = jobs[start:start + BATCH]
                plan = plans[(method, batch[0][0].name, batch[0][1])]
                result = generator.generate(plan, [ps.prompts[i] for ps, i, _ in batch], steps=cfg.steps or None,
                                            guidance=cfg.guidance, width=cfg.size or None, height=cfg.size or None,
                                            seeds=[s for _, _, s in batch])
                new = []
                for (ps, i, s), image in zip(batch, result.images, strict=True):
                    rel = Path("images") / slug(method) / slug(ps.name) / f"{i:05d}-{s}.png"
                    (cfg.out_dir / rel).parent.mkdir(parents=True, exist_ok=True)
                    tmp = (cfg.out_dir / rel).with_suffix(".tmp.png")
                    image.save(tmp)
                    tmp.replace(cfg.out_dir / rel)
                    new.append({"method": method, "set": ps.name, "index": i, "prompt": ps.prompts[i], "seed": s,
                                "image": str(rel), "planner": versions[method], "scores": {}})
                _score_records(new, cfg.out_dir, sets, usable, result.images)
                writer.append(new)
                for r in new:
                    records[(method, r["set"], r["index"], r["seed"])] = r
                done += len(batch)
                if progress:
                    progress(method, done, total)
    return run


def _have(records: dict[tuple[str, str, int, int], dict[str, Any]], method: str, ps: PromptSet, i: int,
          seed: int, version: str) -> bool:
    r = records.get((method, ps.name, i, seed))
    return r is not None and r["prompt"] == ps.prompts[i] and r.get("planner", "") == version


def planner_version(settings: Settings, method: str) -> str:
    """The planner checkpoint a vgae row would use now ("" for the other methods)."""
    from evaluation.methods import Vgae

    cls = METHODS[method]
    if not issubclass(cls, Vgae):
        return ""
    from planner.vgae_checkpoints import latest_checkpoint

    ckpt = latest_checkpoint(settings, target=cls.target)
    return ckpt.version if ckpt is not None else "none"


def _named(scorer: MetricScorer) -> Any:
    def utility(images: list[Any], prompts: list[str]) -> list[float]:
        return scorer.score(images, prompts)

    utility.name = scorer.version  # type: ignore[attr-defined]
    return utility


def _load_checkpoints(ctx: EvalContext, methods: dict[str, Any]) -> None:
    """All checkpoint experts of the family, with verified local paths (soup, dare, swarms)."""
    if not {"soup", "dare", "swarms"} & set(methods):
        return
    from core.types import ExpertKind, PlannedExpert
    from crawler.downloads import ensure_local
    from graphdb.backends import store_session
    from graphdb.store import ExpertFilter

    with store_session(ctx.settings) as store:
        experts = store.find_experts(ExpertFilter(kind=ExpertKind.checkpoint, base_family=ctx.family))
    experts.sort(key=lambda e: e.id)
    ctx.checkpoints = [
        PlannedExpert(expert_id=e.id, name=e.name, kind=ExpertKind.checkpoint, coefficient=0.0,
                      path=str(ensure_local(ctx.settings, e)),
                      sha256=e.primary_file.sha256 if e.primary_file else None, reason="all checkpoints")
        for e in experts
    ]


def _make_plans(ctx: EvalContext, methods: dict[str, Any], pending: dict[str, list[tuple[PromptSet, int]]]
                ) -> dict[tuple[str, str, int], MergePlan]:
    plans: dict[tuple[str, str, int], MergePlan] = {}

    def make() -> None:
        for method, items in pending.items():
            for ps, i in items:
                plans[(method, ps.name, i)] = methods[method].plan(ctx, ps.prompts[i])

    if any(m.needs_store for m in methods.values()):
        from graphdb.backends import store_session

        with store_session(ctx.settings) as store:  # the embedded graph admits one process: plan, then close
            ctx.store = store
            try:
                make()
            finally:
                ctx.store = None
    else:
        make()
    return plans


def _score_records(recs: list[dict[str, Any]], out_dir: Path, sets: list[PromptSet],
                   usable: Callable[[bool], dict[str, MetricScorer]], images: list[Any] | None = None) -> None:
    """Add every missing available score to ``recs`` (images given, or read from disk)."""
    from PIL import Image

    world = {s.name: s.is_world for s in sets}
    by_kind: dict[bool, list[int]] = {}
    for n, r in enumerate(recs):
        by_kind.setdefault(world.get(r["set"], False), []).append(n)
    for kind, idx in by_kind.items():
        for metric, scorer in usable(kind).items():
            todo = [n for n in idx if metric not in recs[n]["scores"]]
            if not todo:
                continue
            imgs = []
            for n in todo:
                if images is not None:
                    imgs.append(images[n])
                else:
                    with Image.open(out_dir / recs[n]["image"]) as im:
                        imgs.append(im.convert("RGB"))
            values = scorer.score(imgs, [recs[n]["prompt"] for n in todo])
            for n, v in zip(todo, values, strict=True):
                recs[n]["scores"][metric] = round(float(v), 6)


def _rescore(cfg: EvalConfig, sets: list[PromptSet], records: dict[tuple[str, str, int, int], dict[str, Any]],
             usable: Callable[[bool], dict[str, MetricScorer]], writer: _Writer) -> None:
    names = {s.name: s for s in sets}
    stale = []
    for key, r in records.items():
        ps = names.get(r["set"])
        if r["method"] not in cfg.methods or ps is None or r["index"] >= len(ps.prompts):
            continue
        if ps.prompts[r["index"]] != r["prompt"] or not (cfg.out_dir / r["image"]).is_file():
            continue
        if set(usable(ps.is_world)) - set(r["scores"]):
            stale.append(key)
    for start in range(0, len(stale), 32):
        recs = [dict(records[k], scores=dict(records[k]["scores"])) for k in stale[start:start + 32]]
        _score_records(recs, cfg.out_dir, sets, usable)
        writer.append(recs)
        for k, r in zip(stale[start:start + 32], recs, strict=True):
            records[k] = r


__all__ = ["EvalConfig", "EvalRun", "run_eval", "prepare", "DiffGraphError"]
