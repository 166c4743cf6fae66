"""Planner benchmark (not a test): plan() latency, VGAE inference and training cost, retrieval quality.

1. Latency on a synthetic N-expert graph (default 10,000; skill embeddings are noisy copies of real
   MiniLM embeddings of the Civitai fixture models, 20% checkpoints, sd15/sdxl): ``plan()`` p50/p95 without
   an LLM for ``similarity`` and ``vgae`` on one open store, and ``make_plan()`` (opens the store per call).
   Targets: plan() p50 <= 100 ms.
2. VGAE inference on a 50-node subgraph (target <= 10 ms) and training seconds per epoch on the calibrated
   part of the graph.
3. Retrieval quality on the real Civitai fixtures (``../shared/fixtures/civitai/dfanr_CivitaiModelList``:
   LORA top 80 + Checkpoint top 40): each model version is registered with a skill text from its name,
   tags, trained words and description. For showcase images whose ``meta.prompt`` has a ``<lora:name:w>``
   tag or whose ``meta.resources``/``meta.hashes`` name a registered LoRA, the query is the image prompt
   with ``<lora:…>`` tags and that LoRA's trained words removed. Recall@5/10 of that LoRA: our retrieval
   (fused score) vs plain cosine of the prompt embedding (``GraphStore.candidates``) in the same run.
   Only showcase images with even ids are read (odd ids are the held-out test split of
   ``benchmarks/retrieval.py``, which measures retrieval on the crawled dev split).

Usage: ``python benchmarks/plan.py [--experts 10000] [--runs 40] [--threads 1] [--skip-latency]``.
"""

from __future__ import annotations

import argparse
import html
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from core.settings import Settings  # noqa: E402
from core.types import Capability, Expert, ExpertFile, ExpertKind, RefPrompt  # noqa: E402

CIVITAI = ROOT.parent / "shared" / "fixtures" / "civitai" / "dfanr_CivitaiModelList"
PROMPTS = ROOT / "tests" / "fixtures" / "prompts" / "imagereward_benchmark-prompts.json"
_LORA_TAG = re.compile(r"<lora:([^:>]+)(?::[^>]*)?>", re.IGNORECASE)
_ANY_TAG = re.compile(r"<(?:lora|lyco|hypernet):[^>]*>", re.IGNORECASE)


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values) * 1000.0, q))


# ---- Civitai fixtures -> experts -------------------------------------------------------------------
def _text(desc: str | None) -> str:
    return re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", desc or ""))).strip()


def _even_id(image: object) -> bool:
    try:
        return isinstance(image, dict) and int(image.get("id")) % 2 == 0
    except (TypeError, ValueError):
        return False


def civitai_experts(embedder) -> tuple[list[Expert], list[dict]]:
    """Experts (first version of each model) and the raw LoRA items, from the fixture JSONL files."""
    experts: list[Expert] = []
    lora_items: list[dict] = []
    for fname, kind in (
        ("LORA_normal_top80.jsonl", ExpertKind.lora),
        ("Checkpoint_normal_top40.jsonl", ExpertKind.checkpoint),
    ):
        for line in (CIVITAI / fname).read_text(encoding="utf-8").splitlines():
            item = json.loads(line)
            for version in item["modelVersions"]:  # odd image ids are the held-out test split: never read
                version["images"] = [im for im in version.get("images") or [] if _even_id(im)]
            v = item["modelVersions"][0]
            trained = [w.strip() for w in v.get("trainedWords") or [] if w and w.strip()][:20]
            skill = ". ".join(
                p
                for p in (
                    item["name"],
                    f"tags: {', '.join(item.get('tags') or [])}",
                    f"trigger words: {', '.join(trained)}" if trained else "",
                    _text(item.get("description"))[:600],
                )
                if p
            )
            files = [
                ExpertFile(
                    name=f["name"][:500],
                    sha256=(f.get("hashes") or {}).get("SHA256"),
                    autov2=(f.get("hashes") or {}).get("AutoV2"),
                )
                for f in v.get("files") or []
            ]
            stats = item.get("stats") or {}
            experts.append(
                Expert(
                    id=f"civitai:{v['id']}",
                    source="civitai",
                    source_model_id=str(item["id"]),
                    source_version_id=str(v["id"]),
                    name=item["name"][:500],
                    kind=kind,
                    base_model=v.get("baseModel") or "",
                    base_family="sd15" if (v.get("baseModel") or "").startswith("SD 1") else "other",
                    skill=skill[:4000],
                    trained_words=trained,
                    tags=(item.get("tags") or [])[:64],
                    nsfw=bool(item.get("nsfw")),
                    downloads=int(stats.get("downloadCount") or 0),
                    rating=float(stats.get("rating") or 0.0),
                    files=files,
                )
            )
            if kind is ExpertKind.lora:
                lora_items.append(item)
    top = max(e.downloads for e in experts) or 1
    vecs = embedder.encode([e.skill for e in experts])
    return [
        e.model_copy(
            update={"embedding": vec.tolist(), "popularity": float(np.log1p(e.downloads) / np.log1p(top))}
        )
        for e, vec in zip(experts, vecs, strict=True)
    ], lora_items


def lora_queries(experts: list[Expert], lora_items: list[dict]) -> list[tuple[str, str]]:
    """(query, expert id of the LoRA used) for showcase images that reference a registered LoRA."""
    loras = [e for e in experts if e.kind is ExpertKind.lora]
    by_name: dict[str, str] = {}
    by_hash: dict[str, str] = {}
    for e in loras:
        for f in e.files:
            by_name[Path(f.name).stem.lower()] = e.id
            if f.autov2:
                by_hash[f.autov2.lower()[:10]] = e.id
            if f.sha256:
                by_hash[f.sha256.lower()[:10]] = e.id
    words = {e.id: e.trained_words for e in loras}
    out: dict[tuple[str, str], None] = {}
    for item in lora_items:
        for v in item["modelVersions"]:
            for im in v.get("images") or []:
                meta = im.get("meta") or {}
                prompt = meta.get("prompt")
                if not isinstance(prompt, str) or not prompt.strip():
                    continue
                used = {
                    by_name[m.group(1).strip().lower()]
                    for m in _LORA_TAG.finditer(prompt)
                    if m.group(1).strip().lower() in by_name
                }
                for r in meta.get("resources") or []:
                    if isinstance(r, dict) and str(r.get("type", "")).lower() in {"lora", "locon", "lycoris"}:
                        name, h = str(r.get("name", "")).lower(), str(r.get("hash", "")).lower()[:10]
                        used |= {x for x in (by_name.get(name), by_hash.get(h)) if x}
                for key, h in (
                    (meta.get("hashes") or {}).items() if isinstance(meta.get("hashes"), dict) else []
                ):
                    if str(key).lower().startswith("lora:"):
                        used |= {
                            x
                            for x in (by_name.get(str(key)[5:].lower()), by_hash.get(str(h).lower()[:10]))
                            if x
                        }
                for eid in used:
                    query = _ANY_TAG.sub(" ", prompt)
                    for w in sorted(words[eid], key=len, reverse=True):
                        query = re.sub(re.escape(w), " ", query, flags=re.IGNORECASE)
                    query = re.sub(r"\s+", " ", re.sub(r"(,\s*)+", ", ", query)).strip(" ,")[:2000]
                    if len(query) >= 10:
                        out.setdefault((query, eid), None)
    return list(out)


def retrieval_quality(embedder) -> dict:
    from graphdb.backends import store_session
    from planner.parse import parse_offline
    from planner.retrieval import Query, candidate_filter, rank_experts

    experts, lora_items = civitai_experts(embedder)
    queries = lora_queries(experts, lora_items)
    settings = Settings(data_dir=Path(tempfile.mkdtemp(prefix="plan-bench-civitai-")), allow_nsfw=True)
    with store_session(settings) as store:
        store.upsert_experts(experts)
        filters = candidate_filter(settings)
        hits = {"ours": {5: 0, 10: 0}, "cosine": {5: 0, 10: 0}}
        per_lora: dict[str, int] = {}
        qvecs = embedder.encode([q for q, _ in queries])
        for (text, target), qvec in zip(queries, qvecs, strict=True):
            per_lora[target] = per_lora.get(target, 0) + 1
            query = Query.build(embedder, text, parse_offline(text))
            ours = [c.expert.id for c in rank_experts(store, query, "lora", None, 10, filters)]
            plain = [c.expert.id for c in store.candidates(qvec, kind="lora", k=10, filters=filters)]
            for name, ranking in (("ours", ours), ("cosine", plain)):
                for k in (5, 10):
                    hits[name][k] += target in ranking[:k]
    n = len(queries)
    # macro average over LoRAs too, so LoRAs with many showcase images do not dominate
    return {
        "experts": len(experts),
        "loras": sum(e.kind is ExpertKind.lora for e in experts),
        "queries": n,
        "loras_with_queries": len(per_lora),
        **{f"{name}_recall@{k}": round(hits[name][k] / max(n, 1), 3) for name in hits for k in (5, 10)},
    }


# ---- synthetic large graph ------------------------------------------------------------------------
def build_large_graph(settings: Settings, embedder, n_experts: int, seed: int = 0) -> dict:
    from graphdb.backends import store_session

    rng = np.random.default_rng(seed)
    base, _ = civitai_experts(embedder)
    anchors = np.asarray([e.embedding for e in base], dtype=np.float32)
    idx = rng.integers(0, len(anchors), n_experts)
    vecs = (
        anchors[idx]
        + 0.25
        * rng.standard_normal((n_experts, anchors.shape[1])).astype(np.float32)
        / np.sqrt(anchors.shape[1])
        * 8
    )
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    experts = [
        Expert(
            id=f"bench:{i}",
            source="bench",
            name=f"{base[j].name} v{i}",
            kind=ExpertKind.checkpoint if i % 5 == 0 else ExpertKind.lora,
            base_family="sd15" if i % 10 < 7 else "sdxl",
            skill=base[j].skill[:300],
            embedding=v.tolist(),
            popularity=float(rng.random()),
        )
        for i, (j, v) in enumerate(zip(idx, vecs, strict=True))
    ]
    prompts_text = [r["prompt"] for r in json.loads(PROMPTS.read_text())]
    pvecs = embedder.encode(prompts_text[:60])
    refs = [
        RefPrompt(id=f"ref:{i}", category=f"c{i % 6}", text=t, embedding=v.tolist())
        for i, (t, v) in enumerate(zip(prompts_text[:60], pvecs, strict=True))
    ]
    calibrated = experts[: min(2000, n_experts)]
    sims = np.asarray([e.embedding for e in calibrated]) @ pvecs.T
    caps = [
        Capability(
            expert_id=e.id,
            prompt_id=refs[j].id,
            score=float(np.clip(0.5 + 1.5 * (sims[i, j] - sims[i].mean()), 0, 1)),
        )
        for i, e in enumerate(calibrated)
        for j in rng.choice(len(refs), 20, replace=False)
    ]
    t0 = time.perf_counter()
    with store_session(settings) as store:
        store.upsert_experts(experts)
        store.upsert_ref_prompts(refs)
        store.write_capabilities(caps)
        t1 = time.perf_counter()
        n_sim = store.link_similar(5)
    return {
        "experts": n_experts,
        "capability_edges": len(caps),
        "similar_edges": n_sim,
        "build_s": round(t1 - t0, 1),
        "link_similar_s": round(time.perf_counter() - t1, 1),
        "prompts": prompts_text[60:],
    }


def latency(settings: Settings, embedder, prompts: list[str], runs: int) -> dict:
    from graphdb.backends import store_session
    from planner import make_plan
    from planner.agent import ExpertSelectionAgent

    out: dict[str, float] = {}
    with store_session(settings) as store:
        agent = ExpertSelectionAgent(settings, store, embedder=embedder)
        for method in ("similarity", "vgae"):
            agent.plan(prompts[0], method=method)  # warm caches (candidate banks, model)
            times, stages = [], {}
            for i in range(runs):
                t = time.perf_counter()
                plan = agent.plan(prompts[i % len(prompts)], method=method)
                times.append(time.perf_counter() - t)
                for k, v in plan.timings.items():
                    stages.setdefault(k, []).append(v)
            out[f"plan_{method}_p50_ms"] = round(pct(times, 50), 1)
            out[f"plan_{method}_p95_ms"] = round(pct(times, 95), 1)
            out[f"plan_{method}_stage_p50_ms"] = {k: round(pct(v, 50), 1) for k, v in stages.items()}
        vec = embedder.encode([prompts[0]])[0]
        calls = []
        for _ in range(20):
            t = time.perf_counter()
            store.candidates(vec, kind="lora", base_family="sd15", k=48)
            calls.append(time.perf_counter() - t)
        out["store_candidates_call_p50_ms(k=48)"] = round(pct(calls, 50), 1)
    times = []
    for i in range(min(runs, 10)):
        t = time.perf_counter()
        make_plan(settings, prompts[i % len(prompts)], method="vgae")
        times.append(time.perf_counter() - t)
    out["make_plan_vgae_p50_ms(opens store)"] = round(pct(times, 50), 1)
    return out


def vgae_inference(settings: Settings, embedder, runs: int) -> dict:
    from graphdb.subgraph import Subgraph, SubgraphEdge, SubgraphNode
    from planner.coefficients import predict_beta
    from planner.vgae_checkpoints import latest_checkpoint

    ckpt = latest_checkpoint(settings)
    rng = np.random.default_rng(1)
    nodes, edges = [], []
    for i in range(10):
        nodes.append(SubgraphNode(f"e{i}", "lora" if i % 3 else "checkpoint", family="sd15"))
    for j in range(39):
        nodes.append(SubgraphNode(f"p{j}", "refprompt", text="x", category="c"))
        for i in range(10):
            if rng.random() < 0.5:
                edges.append(SubgraphEdge(f"e{i}", f"p{j}", "CAPABILITY", float(rng.random())))
    emb = rng.standard_normal((49, embedder.dim)).astype(np.float32)
    sub = Subgraph(nodes, edges, emb / np.linalg.norm(emb, axis=1, keepdims=True))
    q = embedder.encode(["a castle on a hill"])[0]
    ids = [f"e{i}" for i in range(10)]
    features = {e: [0.5] * ckpt.config.pair_dim for e in ids} if ckpt.config.pair_dim else None
    predict_beta(ckpt.model, sub, "q", q, ids, features)
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        predict_beta(ckpt.model, sub, "q", q, ids, features)
        times.append(time.perf_counter() - t)
    return {
        "vgae_50_nodes_p50_ms": round(pct(times, 50), 2),
        "vgae_50_nodes_p95_ms": round(pct(times, 95), 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--experts", type=int, default=10_000)
    ap.add_argument("--runs", type=int, default=40)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0 = torch default)")
    ap.add_argument("--skip-latency", action="store_true")
    ap.add_argument("--fixtures", type=Path, default=None, help="the dfanr_CivitaiModelList directory")
    args = ap.parse_args()
    global CIVITAI
    CIVITAI = args.fixtures or CIVITAI

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from core.embeddings import get_embedder
    from planner.train import train_planner

    report: dict[str, object] = {"torch_threads": torch.get_num_threads(), "loadavg_start": os.getloadavg()}
    embedder = get_embedder(Settings())
    if not CIVITAI.is_dir():
        print(json.dumps({"error": f"{CIVITAI} not found: the benchmark needs the shared Civitai fixtures"}))
        return
    if not args.skip_latency:
        settings = Settings(data_dir=Path(tempfile.mkdtemp(prefix="plan-bench-")))
        graph = build_large_graph(settings, embedder, args.experts)
        prompts = graph.pop("prompts")
        report["graph"] = graph
        trained = train_planner(settings, epochs=args.epochs, seed=0)
        report["train"] = {
            "nodes": trained.n_experts + trained.n_prompts,
            "capability_edges": trained.n_edges,
            "epochs": args.epochs,
            "seconds_per_epoch": round(trained.metrics["seconds_per_epoch"], 4),
            "total_s": round(trained.seconds, 1),
        }
        report["latency"] = latency(settings, embedder, prompts, args.runs)
        report["inference"] = vgae_inference(settings, embedder, 200)
    report["retrieval_quality"] = retrieval_quality(embedder)
    report["loadavg_end"] = os.getloadavg()
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
