"""Scale benchmark of the embedded expert graph (not a test).

Builds a synthetic graph (default 100,000 experts with 384-d embeddings and 1,000,000 CAPABILITY edges)
through the store's own write methods (``upsert_experts`` / ``write_capabilities`` switch to
``COPY FROM`` arrow above ``bulk_threshold``), then measures:

* insert throughput, against a naive per-row parameterised ``MERGE``/``CREATE`` baseline;
* ``candidates`` top-20 latency p50/p95, against plain numpy cosine over a preloaded matrix;
* ``activate_subgraph`` + ``to_pyg`` for 10 experts x 100 reference prompts, against fetching the
  same subgraph's embeddings row by row as Python lists.

Usage: ``python benchmarks/graph_scale.py [--experts N] [--edges M] [--path DIR]``.
Targets: candidates p50 <= 20 ms, activation + export <= 50 ms.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.types import Capability, Expert, ExpertKind, RefPrompt  # noqa: E402
from graphdb.embedded.store import EmbeddedGraphStore  # noqa: E402

FAMILIES = ("sd15", "sdxl", "flux", "sd2", "pony")
KINDS = (ExpertKind.checkpoint, ExpertKind.lora, ExpertKind.lora, ExpertKind.locon, ExpertKind.loha)
N_PROBE = 10
PROBE_PROMPTS = 100
DIM = 384


def unit_rows(rng: np.random.Generator, n: int) -> np.ndarray:
    m = rng.standard_normal((n, DIM)).astype(np.float32)
    return m / np.linalg.norm(m, axis=1, keepdims=True)


def make_experts(start: int, stop: int, emb: np.ndarray) -> list[Expert]:
    return [
        Expert(
            id=f"synthetic:{i}",
            source="synthetic",
            source_version_id=str(i),
            name=f"Synthetic expert {i}",
            kind=KINDS[(i // len(FAMILIES)) % len(KINDS)],
            base_model=FAMILIES[i % len(FAMILIES)],
            base_family=FAMILIES[i % len(FAMILIES)],
            tags=[f"tag{i % 50}", f"style{i % 7}"],
            creator=f"creator{i % 500}",
            nsfw=i % 13 == 0,
            allow_commercial_use="Image" if i % 3 else "None",
            popularity=(i % 100) / 100,
            content_hash=f"h{i}",
            embedding=emb[i - start].tolist(),
        )
        for i in range(start, stop)
    ]


def log(message: str) -> None:
    print(f"  [{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def percentile(samples: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(samples) * 1000, q))


def timed(fn: Callable[[], object], repeat: int) -> list[float]:
    out = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--experts", type=int, default=100_000)
    parser.add_argument("--edges", type=int, default=1_000_000)
    parser.add_argument("--prompts", type=int, default=1_000, help="reference prompts (>= 100)")
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--batch", type=int, default=20_000, help="experts per upsert batch")
    parser.add_argument("--baseline-rows", type=int, default=300, help="rows for the per-row baselines")
    parser.add_argument("--similar", type=int, default=5, help="k for link_similar (0 = skip)")
    parser.add_argument("--path", type=Path, default=None, help="database directory (default: a temp dir)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    n_prompts = max(args.prompts, PROBE_PROMPTS)
    rng = np.random.default_rng(args.seed)
    workdir = Path(tempfile.mkdtemp(prefix="graph-scale-")) if args.path is None else args.path
    results: list[tuple[str, str, str, str]] = []
    print(
        f"graph_scale: {args.experts:,} experts, {args.edges:,} CAPABILITY edges, {n_prompts} prompts, {workdir}"
    )

    store = EmbeddedGraphStore(str(workdir / "graph"))
    try:
        # inserts ------------------------------------------------------------------------------------
        t_experts = 0.0
        for start in range(0, args.experts, args.batch):
            stop = min(start + args.batch, args.experts)
            batch = make_experts(start, stop, unit_rows(rng, stop - start))
            t = time.perf_counter()
            store.upsert_experts(batch)
            t_experts += time.perf_counter() - t
        log(f"{args.experts:,} experts inserted in {t_experts:.1f} s")
        prompt_emb = unit_rows(rng, n_prompts)
        store.upsert_ref_prompts(
            [
                RefPrompt(
                    id=f"ref:{j}",
                    category=f"cat{j % 12}",
                    text=f"reference prompt {j}",
                    embedding=prompt_emb[j].tolist(),
                )
                for j in range(n_prompts)
            ]
        )
        probes = [f"synthetic:{i}" for i in range(1, 1 + N_PROBE * 5, 5)][:N_PROBE]
        probe_set = set(probes)
        others = [i for i in range(args.experts) if f"synthetic:{i}" not in probe_set]
        budget = max(0, args.edges - N_PROBE * PROBE_PROMPTS)
        per_expert, extra = divmod(budget, max(1, len(others)))  # the first `extra` experts get one more
        per_expert = max(1, per_expert)
        t_edges = 0.0
        n_edges = 0
        chunk = max(1, 100_000 // per_expert)
        jobs: list[list[tuple[str, int]]] = [[(p, j) for p in probes for j in range(PROBE_PROMPTS)]]
        for s in range(0, len(others), chunk):
            ids = others[s : s + chunk]
            offsets = rng.integers(0, n_prompts, size=len(ids))
            jobs.append(
                [
                    (f"synthetic:{i}", int((o + q) % n_prompts))
                    for n, (i, o) in enumerate(zip(ids, offsets, strict=True), start=s)
                    for q in range(per_expert + (n < extra))
                ]
            )
        for pairs in jobs:
            scores = rng.random(len(pairs))
            caps = [
                Capability(
                    expert_id=e,
                    prompt_id=f"ref:{j}",
                    score=float(sc),
                    metrics={"clip_gain": float(sc) / 10},
                    n_images=2,
                )
                for (e, j), sc in zip(pairs, scores, strict=True)
            ]
            t = time.perf_counter()
            n_edges += store.write_capabilities(caps)
            t_edges += time.perf_counter() - t
        log(f"{n_edges:,} CAPABILITY edges inserted in {t_edges:.1f} s")
        results.append(("insert experts (bulk COPY path)", f"{args.experts / t_experts:,.0f}/s", "", ""))
        results.append(("insert CAPABILITY (bulk COPY path)", f"{n_edges / t_edges:,.0f}/s", "", ""))
        if args.similar:
            t = time.perf_counter()
            n_sim = store.link_similar(args.similar)
            results.append(
                (
                    f"link_similar k={args.similar} ({n_sim:,} edges)",
                    f"{time.perf_counter() - t:.1f} s",
                    "",
                    "",
                )
            )

            log(f"link_similar done ({n_sim:,} edges)")
        # a calibration-sized write at scale: 100 capabilities of one expert, replacing existing ones
        one = [Capability(expert_id=probes[0], prompt_id=f"ref:{j}", score=0.5) for j in range(PROBE_PROMPTS)]
        small = timed(lambda: store.write_capabilities(one), 5)
        results.append(
            ("write_capabilities 100 edges (small path)", f"{percentile(small, 50):.1f} ms p50", "", "")
        )

        # candidates ---------------------------------------------------------------------------------
        queries = unit_rows(rng, args.queries)
        t = time.perf_counter()
        store.candidates(queries[0], kind="lora", base_family="sd15", k=20)
        cold = time.perf_counter() - t
        cand = [
            timed(lambda q=q: store.candidates(q, kind="lora", base_family="sd15", k=20), 1)[0]
            for q in queries
        ]
        # the same slice, preloaded, for the plain numpy baseline
        matrix = store._bank().slice("LoRA", "sd15")[1].copy()

        def numpy_top20(q: np.ndarray) -> np.ndarray:
            s = matrix @ q
            top = np.argpartition(-s, 20)[:20]
            return top[np.argsort(-s[top])]

        base = [timed(lambda q=q: numpy_top20(q), 1)[0] for q in queries]
        results.append(
            (
                "candidates top-20 (lora, sd15) p50",
                f"{percentile(cand, 50):.2f} ms",
                f"{percentile(base, 50):.2f} ms",
                f"{percentile(cand, 50) / percentile(base, 50):.1f}x",
            )
        )
        results.append(
            (
                "candidates top-20 p95",
                f"{percentile(cand, 95):.2f} ms",
                f"{percentile(base, 95):.2f} ms",
                f"{percentile(cand, 95) / percentile(base, 95):.1f}x",
            )
        )
        results.append(("candidates first call (builds cache)", f"{cold * 1000:.0f} ms", "", ""))

        log("candidates measured")
        # activation + export --------------------------------------------------------------------------
        import torch  # noqa: F401  (import cost kept out of the timings)

        prompt = queries[0]
        sub = store.activate_subgraph(probes, prompt_embedding=prompt)
        sub.to_pyg()
        act = timed(lambda: store.activate_subgraph(probes, prompt_embedding=prompt).to_pyg(), 20)
        engine = store._engine

        def row_by_row() -> None:  # baseline: the same reads, embeddings as Python lists row by row
            engine.execute(
                "UNWIND $ids AS i MATCH (e:Expert {id: i}) RETURN e.id, e.embedding", {"ids": probes}
            )
            engine.execute(
                "UNWIND $ids AS i MATCH (a:Expert {id: i})-[c:CAPABILITY]->(p:RefPrompt) "
                "RETURN a.id, p.id, c.score, c.metrics, p.embedding",
                {"ids": probes},
            )
            engine.execute(
                "UNWIND $ids AS i MATCH (a:Expert {id: i})-[s:SIMILAR_TO]-(e:Expert) "
                "RETURN a.id, e.id, s.score, e.embedding",
                {"ids": probes},
            )

        naive = timed(row_by_row, 2)  # slow at scale: a few samples suffice
        n_caps = sum(e.type == "CAPABILITY" for e in sub.edges)
        results.append(
            (
                f"activate+to_pyg ({len(sub.nodes)} nodes, {n_caps} CAPABILITY) p50",
                f"{percentile(act, 50):.1f} ms",
                f"{percentile(naive, 50):.1f} ms",
                f"{percentile(act, 50) / percentile(naive, 50):.2f}x",
            )
        )
        results.append(("activate+to_pyg p95", f"{percentile(act, 95):.1f} ms", "", ""))

        log("activation measured")
        # per-row baselines for inserts (run last: they add rows) ----------------------------------------
        n = args.baseline_rows
        extra = make_experts(args.experts, args.experts + n, unit_rows(rng, n))
        t = time.perf_counter()
        for e in extra:
            engine.execute(
                "MERGE (x:Expert {id: $id}) SET x.name = $name, x.kind = $kind, x.label = $label, "
                "x.base_family = $fam, x.embedding = $emb, x.content_hash = $h",
                {
                    "id": e.id,
                    "name": e.name,
                    "kind": e.kind.value,
                    "label": e.label,
                    "fam": e.base_family,
                    "emb": e.embedding,
                    "h": e.content_hash,
                },
            )
        row_experts = n / (time.perf_counter() - t)
        t = time.perf_counter()
        for k, e in enumerate(extra):
            engine.execute(
                "MATCH (a:Expert {id: $s}), (b:RefPrompt {id: $d}) CREATE (a)-[:CAPABILITY {score: $sc}]->(b)",
                {"s": e.id, "d": f"ref:{k % n_prompts}", "sc": 0.5},
            )
        row_edges = n / (time.perf_counter() - t)
        results.insert(0, ("insert experts, per-row MERGE baseline", f"{row_experts:,.0f}/s", "", ""))
        results.insert(1, ("insert CAPABILITY, per-row CREATE baseline", f"{row_edges:,.0f}/s", "", ""))
        exp_rate = args.experts / t_experts
        edge_rate = n_edges / t_edges
        results.append(("bulk vs per-row: experts", f"{exp_rate / row_experts:.1f}x faster", "", ""))
        results.append(("bulk vs per-row: CAPABILITY", f"{edge_rate / row_edges:.1f}x faster", "", ""))
    finally:
        store.close()
        if args.path is None:
            shutil.rmtree(workdir, ignore_errors=True)

    width = max(len(r[0]) for r in results)
    print(f"\n{'measure':<{width}}  {'store':>16}  {'baseline':>10}  {'ratio':>8}")
    for name, value, baseline, ratio in results:
        print(f"{name:<{width}}  {value:>16}  {baseline:>10}  {ratio:>8}")
    cand_p50 = percentile(cand, 50)
    act_p50 = percentile(act, 50)
    print(
        f"\ntargets: candidates p50 <= 20 ms: {'MET' if cand_p50 <= 20 else 'MISSED'} ({cand_p50:.2f} ms); "
        f"activation+export p50 <= 50 ms: {'MET' if act_p50 <= 50 else 'MISSED'} ({act_p50:.1f} ms)"
    )


if __name__ == "__main__":
    main()
