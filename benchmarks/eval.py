"""``diffgraph eval`` throughput on the tiny zoo: methods × prompts against base-only sampling, same run.

Builds the tiny SD1.5-architecture zoo (3 checkpoints, 2 LoRAs) with skills, calibrates it on a few reference
prompts with the tiny CLIP scorer, trains the solo and the merged-outcome VGAE, then times

* ``base only``: ``--methods direct`` on the prompts (the sampling floor);
* ``all methods``: the 8 table methods on the same prompts (planning, merges, swarms search, sampling, scoring);
* ``rerun``: the same command again (everything cached: nothing is sampled);
* ``merged training``: ``planner train --target merged`` (search + fit).

Usage: ``python benchmarks/eval.py [--prompts 24] [--steps 4] [--size 64] [--budget 8]``. Writes under a
temporary directory (or ``--workdir``), never in the repository.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

METHODS = ["direct", "dare", "soup", "swarms", "fixed", "k-lora", "similarity", "vgae"]


def setup(root: Path, calib_prompts: int) -> None:
    from calibration.calibrate import calibrate_experts
    from core.embeddings import get_embedder
    from core.settings import get_settings
    from core.types import ExpertKind
    from graphdb.store import store_session
    from tests.calibration.conftest import local_expert
    from tests.evaluation.conftest import SKILLS
    from tests.fakes.clip import build_tiny_clip
    from tests.fakes.zoo import build_tiny_zoo

    zoo = build_tiny_zoo(root / "zoo")
    clip = build_tiny_clip(root / "scorers")
    os.environ.update({
        "DIFFGRAPH_DATA_DIR": str(root / "var"), "DIFFGRAPH_CONFIG": str(root / "none.toml"),
        "DIFFGRAPH_BASE_MODELS": json.dumps({"sd15": str(zoo.base_dir)}),
        "DIFFGRAPH_SCORER_PATHS": json.dumps(clip), "DIFFGRAPH_DEVICE": "cpu", "DIFFGRAPH_DTYPE": "fp32",
        "DIFFGRAPH_CALIB_STEPS": "2", "DIFFGRAPH_CALIB_SIZE": "32", "DIFFGRAPH_CALIB_PROMPTS": str(calib_prompts),
    })
    get_settings.cache_clear()
    settings = get_settings()
    embedder = get_embedder(settings)
    experts = []
    for attr, i, name, skill in SKILLS:
        kind = ExpertKind.checkpoint if attr == "checkpoints" else ExpertKind.lora
        e = local_expert(getattr(zoo, attr)[i], name, kind, 0.8 if kind == ExpertKind.lora else None)
        vec = [float(v) for v in embedder.encode([f"{name}: {skill}"])[0]]
        experts.append(e.model_copy(update={"skill": skill, "embedding": vec}))
    with store_session(settings) as store:
        store.upsert_experts(experts)
    calibrate_experts(settings, [e.id for e in experts])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=24)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--budget", type=int, default=8)
    ap.add_argument("--workdir", type=Path)
    args = ap.parse_args()
    root = args.workdir or Path(tempfile.mkdtemp(prefix="diffgraph-bench-eval-"))
    try:
        t0 = time.perf_counter()
        setup(root, calib_prompts=8)
        from core.settings import get_settings
        from evaluation.run import EvalConfig, run_eval
        from planner.outcomes import train_merged
        from planner.train import train_planner

        settings = get_settings()
        train_planner(settings, epochs=50)
        print(f"setup (zoo, calibration, solo VGAE): {time.perf_counter() - t0:.1f} s")
        t = time.perf_counter()
        train_merged(settings, epochs=50, n_prompts=8, budget=args.budget, metric="clip")
        merged_s = time.perf_counter() - t

        def timed(methods: list[str], out: str) -> float:
            cfg = EvalConfig(["diffusiondb"], methods, ["cs", "as"], seeds=1, steps=args.steps, size=args.size,
                             out_dir=root / out, limit=args.prompts, swarm_budget=args.budget)
            start = time.perf_counter()
            run_eval(settings, cfg)
            return time.perf_counter() - start

        base = timed(["direct"], "base")
        full = timed(METHODS, "all")
        rerun = timed(METHODS, "all")
        n = args.prompts
        print(f"\n{n} DiffusionDB prompts, 1 seed, {args.steps} steps, {args.size}px, tiny zoo, CPU "
              f"({os.cpu_count()} cores)")
        print(f"{'run':<28}{'wall s':>9}{'s/image':>10}{'vs base-only per image':>24}")
        per_base = base / n
        for label, secs, images in (("base only (direct)", base, n), ("8 methods", full, 8 * n),
                                    ("8 methods, rerun (cached)", rerun, 8 * n)):
            print(f"{label:<28}{secs:>9.1f}{secs / images:>10.3f}{secs / images / per_base:>23.2f}×")
        print(f"{'merged VGAE training':<28}{merged_s:>9.1f}   (8 prompts × budget {args.budget}, 50 epochs)")
        print(f"extrapolated 8 methods × 100 prompts: {full / n * 100 / 60:.1f} min (target ≤ 15 min on the world)")
    finally:
        if args.workdir is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
