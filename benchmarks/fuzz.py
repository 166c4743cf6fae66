"""Fuzz every untrusted-input target with many cases (``make test`` runs a derandomised 60 of each).

    .venv/bin/python benchmarks/fuzz.py --cases 1000 [--seed 1] [--only lora_keys] [--json]

Targets and strategies live in ``tests/fuzz`` (crawled Civitai / Hugging Face pages through spider,
normalise and validate; safetensors headers; LoRA key sets; LLM replies for review, parse and skills).
A crash is any exception other than the project's own clear errors; each is printed with Hypothesis'
minimal failing input, to pin with ``@example`` in ``tests/fuzz/test_fuzz.py`` once fixed. Reports cases
run, crashes and cases per second, and the ratio to the ``make test`` sample (60 cases). Exit 1 on a crash.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

SAMPLE = 60  # cases per target in make test (tests/fuzz/test_fuzz.py)


def run_target(name: str, cases: int, seed: int, verbose: bool = False) -> dict:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import seed as hseed

    from tests.fuzz.targets import TARGETS, run_case

    strategy, _ = TARGETS[name]
    count = {"n": 0}

    @hseed(seed)
    @settings(max_examples=cases, deadline=None, database=None, suppress_health_check=list(HealthCheck),
              print_blob=True)
    @given(strategy)
    def check(value) -> None:
        count["n"] += 1
        run_case(name, value)

    start = time.perf_counter()
    crash = None
    try:
        check()
    except BaseException as exc:  # the failure Hypothesis shrank: report it, go on with the next target
        if isinstance(exc, KeyboardInterrupt):
            raise
        crash = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
        if verbose:
            import traceback

            traceback.print_exception(exc)
    seconds = time.perf_counter() - start
    return {"target": name, "cases": count["n"], "crashes": int(crash is not None), "crash": crash,
            "seconds": round(seconds, 2), "cases_per_s": round(count["n"] / seconds, 1) if seconds else None,
            "x_make_test_sample": round(count["n"] / SAMPLE, 1)}


def main() -> int:
    from tests.fuzz.targets import TARGETS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=1000, help="cases per target (default 1000)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--only", action="append", choices=sorted(TARGETS), help="a target (repeatable)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--verbose", action="store_true", help="print each crash's traceback and input")
    args = parser.parse_args()
    import logging

    logging.disable(logging.WARNING)  # spiders log every broken page; the table is the output
    results = [run_target(name, args.cases, args.seed, args.verbose) for name in (args.only or sorted(TARGETS))]
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print(f"{'target':20} {'cases':>6} {'crashes':>7} {'seconds':>8} {'cases/s':>8} {'x sample':>8}")
        for r in results:
            print(f"{r['target']:20} {r['cases']:>6} {r['crashes']:>7} {r['seconds']:>8} {r['cases_per_s']:>8} "
                  f"{r['x_make_test_sample']:>8}")
            if r["crash"]:
                print(f"  crash: {r['crash']}")
    return 1 if any(r["crashes"] for r in results) else 0


if __name__ == "__main__":
    raise SystemExit(main())
