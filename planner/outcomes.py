"""Train the VGAE's Beta head toward merge coefficients that scored best when the merge was actually sampled.

``diffgraph planner train --target merged``. For each of ``n_prompts`` calibration reference prompts:

1. ESA selects experts for the prompt (the ``fixed`` plan: what any method would merge);
2. the budgeted Model Swarms search (:mod:`planner.swarms`) samples and scores merges of those experts on the
   prompt and keeps the coefficient vectors with the best score (``metric``: the mini world's ``adherence``
   when it is installed, else the ``clip`` scorer);
3. the coefficient vectors that scored best, each read as the planner reads Beta means (checkpoint values as
   task-vector scales, LoRA values normalised to shares), are averaged, and the average becomes the targets
   of (expert, reference prompt) pairs. Averaging every vector that tied for the best utility (within
   ``TIE``), rather than keeping the first one found, matters because the utility is coarse (adherence moves
   in steps of a quarter per image): a single arbitrary winner among ties is noise the VGAE would learn;
4. a LoRA's average share becomes a target relative to the uniform share (:func:`relative_targets`): 0.5
   means "as uniform" with two LoRAs as with three, and a lone LoRA is no target at all. Raw shares taught
   the decoder mostly the group's size (a lone LoRA's share is 1 whatever the merge), which it cannot see.
   On ``world:compositional-dev``, when checkpoint values were shares too, relative targets took the VGAE
   from +0.007 to +0.021 adherence over ``fixed`` (search of 12 merges × 2 seeds per prompt), +0.041 with
   16 merges × 4 seeds.

The VGAE is then fitted as in :func:`planner.train.fit` with those targets in place of the solo capability
scores, its decoder reading each pair's evidence (:meth:`planner.retrieval.Query.pair_features`, computed for
the reference prompt as ESA computes it for a user prompt): calibration CAPABILITY edges stay node/edge
features, and each epoch's target prompts have their own CAPABILITY edges removed from message passing, so a
target prompt looks like a new user prompt. Inference is unchanged: one forward pass, no search. Search
outcomes are cached under ``<data_dir>/planner/outcomes`` by prompt, experts, budget, metric and sampling
settings, so retraining costs no sampling.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from core.settings import Settings
from core.types import DiffGraphError, MergePlan, utcnow
from graphdb.backends import store_session
from planner.coefficients import checkpoint_coefficients, normalise_checkpoints
from planner.graph import to_tensors
from planner.retrieval import PAIR_FEATURES
from planner.swarms import MergeUtility, SwarmConfig, swarm_search
from planner.train import TrainResult, fingerprint, fit, load_training_graph, with_pair_features
from planner.vgae import VGAEConfig
from planner.vgae_checkpoints import checkpoint_dir, save_checkpoint

log = logging.getLogger(__name__)

TIE = 1e-6  # utilities this close to the best count as tied winners
OUTCOME_FORMAT = 3  # part of the cache key: bump when a record's meaning changes (2: tied winners averaged;
# 3: checkpoint values searched and kept as task-arithmetic scales, not shares)

Progress = Callable[[int, int, float], None]


def utility_scorer(settings: Settings, metric: str | None) -> tuple[str, Callable[[list[Any], list[str]], list[float]]]:
    """``(name, score(images, prompts))``: the world's adherence, or a calibration scorer by name."""
    import importlib

    if metric in (None, "adherence"):
        try:
            world = importlib.import_module("world.scorers")
            return "adherence", world.adherence
        except ModuleNotFoundError as exc:
            if metric == "adherence" or exc.name not in ("world", "world.scorers"):
                raise DiffGraphError("the mini world is not installed (no importable 'world' package)") from None
    from calibration.scorers import LOADERS, Unavailable

    name = metric or "clip"
    if name not in LOADERS:
        raise DiffGraphError(f"unknown metric {name!r}: use adherence or one of {', '.join(LOADERS)}")
    scorer = LOADERS[name](settings)
    if isinstance(scorer, Unavailable):
        raise DiffGraphError(f"metric {name} is unavailable: {scorer.reason}")
    return scorer.version, scorer.score


def _plans(settings: Settings, prompts: list[tuple[str, str]]
           ) -> list[tuple[str, str, MergePlan, list[float | None]]]:
    """ESA's ``fixed`` plan per prompt (paths resolved) and its LoRAs' recommended weights."""
    from crawler.downloads import ensure_local
    from planner.agent import ExpertSelectionAgent

    out = []
    with store_session(settings) as store:
        agent = ExpertSelectionAgent(settings, store)
        for pid, text in prompts:
            plan = agent.plan(text, method="fixed", seed=0)
            if not plan.experts:
                continue
            experts = {pe.expert_id: store.get_expert(pe.expert_id) for pe in plan.experts}
            for pe in plan.experts:
                pe.path = str(ensure_local(settings, experts[pe.expert_id]))
            out.append((pid, text, plan, [experts[pe.expert_id].recommended_weight for pe in plan.loras]))
    return out


def search_outcomes(settings: Settings, n_prompts: int, budget: int, metric: str | None, steps: int, size: int,
                    seeds: int = 1, say: Callable[[str], None] | None = None, jobs: int = 1) -> list[dict[str, Any]]:
    """Per reference prompt: the experts ESA picked and the best coefficient values the search found.

    Searches not cached yet run ``jobs`` at a time in worker processes (one torch thread each: the world's
    tiny models leave a second thread idle, a second process is what uses a second core); each search is
    seeded by its prompt's position, so where it runs does not change what it does."""
    from calibration.refset import load_reference_set

    with store_session(settings) as store:
        known = {p.id: p.text for p in store.list_ref_prompts()}
    ordered = [(p.id, p.text) for p in load_reference_set().prompts if p.id in known]
    ordered += [(pid, text) for pid, text in sorted(known.items()) if pid not in {i for i, _ in ordered}]
    chosen = spread(ordered, n_prompts)
    name, score = utility_scorer(settings, metric)  # an unknown or unavailable metric fails before any search
    cache_dir = checkpoint_dir(settings) / "outcomes"
    cache_dir.mkdir(parents=True, exist_ok=True)
    records: dict[int, dict[str, Any]] = {}
    todo: list[tuple[int, Path, str, str, MergePlan, list[float | None]]] = []
    for n, (pid, text, plan, caps) in enumerate(_plans(settings, chosen), 1):
        experts = [(e.expert_id, e.sha256, e.kind.value) for e in plan.experts]
        key = hashlib.sha256(json.dumps([OUTCOME_FORMAT, pid, text, experts, budget, name, steps, size, seeds,
                                         settings.lora_max_weight]).encode()).hexdigest()[:24]
        path = cache_dir / f"{key}.json"
        if path.is_file():
            records[n] = json.loads(path.read_text())
        else:
            todo.append((n, path, pid, text, plan, caps))

    def done(n: int, record: dict[str, Any]) -> None:
        records[n] = record
        if say:
            say(f"{len(records)}/{len(chosen)} {record['prompt_id']}: best {record['best_utility']:.4f} "
                f"vs uniform {record['uniform_utility']:.4f}")

    search = _Search(settings, metric, name, score, budget, steps, size, seeds)
    if jobs <= 1 or len(todo) <= 1:
        for n, *task in todo:
            done(n, search(n, *task))
    else:
        import concurrent.futures as cf
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")  # no forked torch thread pools
        with cf.ProcessPoolExecutor(max_workers=min(jobs, len(todo)), mp_context=ctx,
                                    initializer=_worker_init, initargs=(search,)) as pool:
            running = {pool.submit(_worker_search, n, *task): n for n, *task in todo}
            try:
                for fut in cf.as_completed(running):
                    done(running[fut], fut.result())
            except BaseException:  # a failed search (or ^C) ends the training now, not after the queued ones
                pool.shutdown(wait=True, cancel_futures=True)
                raise
    return [records[n] for n in sorted(records)]


class _Search:
    """One process's searches: its utility scorer and one Generator, whose pipeline cache serves them all."""

    def __init__(self, settings: Settings, metric: str | None, name: str,
                 score: Callable[[list[Any], list[str]], list[float]] | None, budget: int, steps: int, size: int,
                 seeds: int):
        self.settings, self.metric, self.name, self._score = settings, metric, name, score
        self.budget, self.steps, self.size, self.seeds = budget, steps, size, seeds
        self._generator: Any = None

    def __getstate__(self) -> dict[str, Any]:  # a worker loads its own scorer and builds its own Generator
        return {**self.__dict__, "_score": None, "_generator": None}

    def __call__(self, n: int, path: Path, pid: str, text: str, plan: MergePlan, caps: list[float | None]
                 ) -> dict[str, Any]:
        if self._score is None:
            self._score = utility_scorer(self.settings, self.metric)[1]
        if self._generator is None:
            from merger.generate import Generator

            self._generator = Generator(self.settings)
        utility = MergeUtility(self.settings, plan, [text], self._score, seeds=list(range(self.seeds)),
                               steps=self.steps, size=self.size, lora_caps=caps, generator=self._generator,
                               absolute_checkpoints=True)
        t0 = time.perf_counter()
        result = swarm_search(len(plan.experts), utility, SwarmConfig(budget=self.budget, seed=n))
        trials = [(list(v), u) for v, u in result.evaluations]
        record = {
            "prompt_id": pid, "prompt": text, "metric": self.name,
            "experts": [e.expert_id for e in plan.experts], "targets": tied_best(trials, len(plan.checkpoints)),
            # the search's first point: every value 1 (checkpoints at full scale, LoRAs uniform)
            "best_utility": result.best_utility, "uniform_utility": result.evaluations[0][1],
            "evaluations": len(result.evaluations), "trials": trials,
            "seconds": round(time.perf_counter() - t0, 3),
        }
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(record))
        tmp.replace(path)  # a killed run leaves whole records only
        return record


_WORKER_SEARCH: _Search | None = None


def _worker_init(search: _Search) -> None:
    global _WORKER_SEARCH
    from diffusers.utils import logging as diffusers_logging

    torch.set_num_threads(1)
    diffusers_logging.disable_progress_bar()
    _WORKER_SEARCH = search


def _worker_search(n: int, *task: Any) -> dict[str, Any]:
    assert _WORKER_SEARCH is not None
    return _WORKER_SEARCH(n, *task)


def spread(items: list[Any], n: int) -> list[Any]:
    """``n`` items evenly spaced over the list (all of them when ``n`` ≥ its length): reference ids are grouped
    by category, and the first ``n`` would leave the last categories out."""
    if n >= len(items):
        return list(items)
    return [items[(i * len(items)) // n] for i in range(n)]


def tied_best(trials: list[tuple[list[float], float]], n_checkpoints: int) -> list[float]:
    """The mean of the value vectors whose utility ties the best (within ``TIE``), each turned into what the
    merge used by the planner's own rules (checkpoints: scales, :func:`checkpoint_coefficients`; LoRAs:
    shares, :func:`normalise_checkpoints`), as the swarm's merges are."""
    best = max(u for _, u in trials)
    winners = [checkpoint_coefficients(v[:n_checkpoints], absolute=True) + normalise_checkpoints(v[n_checkpoints:])
               for v, u in trials if u >= best - TIE]
    return [float(x) for x in np.mean(np.asarray(winners, dtype=np.float64), axis=0)]


def relative_targets(experts: list[str], values: list[float], kinds: dict[str, str]) -> list[tuple[str, float]]:
    """``(expert, target)`` pairs from one search's winning values. A checkpoint's value is its scale, the
    target as it is. A LoRA's is its share of the LoRA strength, so it becomes a share relative to the uniform
    one, ``n · share / 2`` clipped to 1: 0.5 means "as uniform" whatever the number of LoRAs (the planner
    normalises LoRA Beta means, so only ratios matter); a lone LoRA is left out, its share being 1 whatever
    the merge (as a target it would only teach the group's size, which the decoder cannot see)."""
    n_loras = sum(1 for e in experts if kinds.get(e) == "lora")
    out = []
    for eid, value in zip(experts, values, strict=True):
        if kinds.get(eid) == "checkpoint":
            out.append((eid, value))
        elif kinds.get(eid) == "lora" and n_loras >= 2:
            out.append((eid, min(1.0, n_loras * value / 2.0)))
    return out


def train_merged(settings: Settings, epochs: int = 200, seed: int = 0, n_prompts: int = 24, budget: int = 8,
                 metric: str | None = None, steps: int | None = None, size: int | None = None, seeds: int = 1,
                 progress: Progress | None = None, say: Callable[[str], None] | None = None, jobs: int = 1
                 ) -> TrainResult:
    """Search merged outcomes, fit the VGAE toward them, and save a checkpoint with ``target="merged"``."""
    started = time.perf_counter()
    sub = load_training_graph(settings)
    graph = to_tensors(sub)
    outcomes = search_outcomes(settings, n_prompts, budget, metric, steps or settings.calib_steps,
                               size or settings.calib_size, seeds=seeds, say=say, jobs=jobs)
    index = graph.index
    kinds = {n.id: n.node_type for n in sub.nodes}
    pairs, targets = [], []
    for rec in outcomes:
        if rec["prompt_id"] not in index:
            continue
        for eid, value in relative_targets(rec["experts"], rec["targets"], kinds):
            if eid in index:
                pairs.append((index[eid], index[rec["prompt_id"]]))
                targets.append(value)
    if not pairs:
        raise DiffGraphError("no merged outcome to learn from: no searched reference prompt's plan merged two "
                             "calibrated experts of one kind")
    merged = replace(graph, cap_pairs=torch.tensor(pairs, dtype=torch.long).t().contiguous(),
                     cap_scores=torch.tensor(targets, dtype=torch.float32))
    merged = with_pair_features(settings, sub, merged)
    config = VGAEConfig(in_dim=int(graph.x.shape[1]), pair_dim=len(PAIR_FEATURES))
    model, metrics = fit(merged, config, epochs=epochs, seed=seed, progress=progress)
    gains = [r["best_utility"] - r["uniform_utility"] for r in outcomes]
    metrics.update({
        "target": "merged",
        "data_fingerprint": fingerprint(merged),
        "n_outcome_prompts": len(outcomes),
        "n_outcome_pairs": len(pairs),
        "search_budget": budget,
        "search_seeds": seeds,
        "search_metric": outcomes[0]["metric"] if outcomes else metric,
        "mean_search_gain_over_uniform": float(np.mean(gains)) if gains else None,
        "search_seconds": round(sum(r["seconds"] for r in outcomes), 3),
    })
    metrics = {k: (None if isinstance(v, float) and np.isnan(v) else v) for k, v in metrics.items()}
    version = f"{utcnow():%Y%m%dT%H%M%S%f}-s{seed}-merged"
    path, model_id = save_checkpoint(settings, version, model, config, metrics, target="merged")
    n_experts = sum(1 for n in sub.nodes if n.node_type in ("checkpoint", "lora"))
    n_prompts_graph = sum(1 for n in sub.nodes if n.node_type == "refprompt")
    return TrainResult(version=version, path=path, model_id=model_id, epochs=epochs, seed=seed,
                       n_experts=n_experts, n_prompts=n_prompts_graph, n_edges=len(pairs),
                       seconds=time.perf_counter() - started, metrics=metrics)
