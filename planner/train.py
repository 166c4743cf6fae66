"""Training loop of the planner VGAE (kept outside the model, as in PyG's examples).

Each epoch a random fraction of the training reference prompts become *targets*: all their CAPABILITY
edges are removed from message passing and the model maximises the Beta likelihood of those edges' scores
(plus the KL term). Masking whole prompts makes a target prompt look exactly like a new user prompt at
inference (linked to the graph only through ``PROMPT_SIMILAR`` edges). A seeded fraction of prompts is
held out for validation metrics (graphs with at least ``MIN_PROMPTS_FOR_VAL`` prompts).
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from core.embeddings import get_embedder
from core.settings import Settings
from core.types import DiffGraphError, utcnow
from graphdb.backends import store_session
from graphdb.subgraph import Subgraph
from planner.graph import GraphTensors, link_ref_prompts, to_tensors
from planner.parse import parse_offline
from planner.retrieval import PAIR_FEATURES, Query
from planner.vgae import BetaVGAE, VGAEConfig
from planner.vgae_checkpoints import save_checkpoint

log = logging.getLogger(__name__)

TARGET_FRACTION = 0.3
VAL_FRACTION = 0.2
MIN_PROMPTS_FOR_VAL = 40  # below this every prompt is needed for training; no validation metrics
LEARNING_RATE = 0.01
WEIGHT_DECAY = 0.0  # 5e-4 made the planted-structure test seed-dependent (min Spearman 0.5-0.99)
KL_WEIGHT = 0.01  # on the per-node KL / n_nodes; at 1.0 the posterior collapsed on small graphs
MAX_EXPERTS = 1_000_000


@dataclass(frozen=True)
class TrainResult:
    version: str
    path: Path
    model_id: int
    epochs: int
    seed: int
    n_experts: int
    n_prompts: int
    n_edges: int
    seconds: float
    metrics: dict[str, Any]

    @property
    def checkpoint_path(self) -> Path:
        """Alias of ``path`` (the saved ``vgae-<version>.pt``)."""
        return self.path

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "path": str(self.path)}


def spearman(a: np.ndarray | list[float], b: np.ndarray | list[float]) -> float:
    """Spearman rank correlation with average ranks for ties (0.0 when either side is constant)."""

    def ranks(x: np.ndarray) -> np.ndarray:
        order = np.argsort(x, kind="stable")
        r = np.empty(len(x), dtype=np.float64)
        r[order] = np.arange(len(x), dtype=np.float64)
        for v in np.unique(x):
            tie = x == v
            r[tie] = r[tie].mean()
        return r

    ra, rb = ranks(np.asarray(a, dtype=np.float64)), ranks(np.asarray(b, dtype=np.float64))
    if ra.std() == 0 or rb.std() == 0:
        return 0.0
    return float(np.corrcoef(ra, rb)[0, 1])


def load_training_graph(settings: Settings) -> Subgraph:
    """The calibrated graph: every expert with CAPABILITY edges, their reference prompts and neighbours."""
    with store_session(settings) as store:
        expert_ids = sorted({c.expert_id for c in store.get_capabilities()})
        if not expert_ids:
            raise DiffGraphError(
                "no calibrated experts (no CAPABILITY edges) to train on: run calibration first"
            )
        sub = store.activate_subgraph(expert_ids[:MAX_EXPERTS])
    return link_ref_prompts(sub)


def _prompt_mask(n_nodes: int, nodes: torch.Tensor) -> torch.Tensor:
    mask = torch.zeros(n_nodes, dtype=torch.bool)
    mask[nodes] = True
    return mask


@torch.no_grad()
def evaluate(model: BetaVGAE, graph: GraphTensors, prompts: torch.Tensor) -> dict[str, float]:
    """NLL, MAE of the Beta mean and mean per-prompt Spearman on ``prompts`` (their edges masked)."""
    if not len(prompts):
        return {}
    model.eval()
    mask = _prompt_mask(len(graph.node_ids), prompts)
    edge_index, edge_weight = graph.message_edges(mask)
    z = model.encode(graph.x, edge_index, edge_weight).mu
    sel = mask[graph.cap_pairs[1]]
    params = model.decode(z, graph.cap_pairs[:, sel], graph.pair_features(sel))
    target = graph.cap_scores[sel]
    rhos = []
    for p in prompts.tolist():
        on_p = graph.cap_pairs[1, sel] == p
        if int(on_p.sum()) >= 3:
            rhos.append(spearman(params.mean[on_p].numpy(), target[on_p].numpy()))
    return {
        "nll": float(model.beta_nll(params, target)),
        "mae": float((params.mean - target).abs().mean()),
        "spearman": float(np.mean(rhos)) if rhos else float("nan"),
    }


def with_pair_features(settings: Settings, sub: Subgraph, graph: GraphTensors) -> GraphTensors:
    """``graph`` with each target pair's evidence (``planner.retrieval.Query.pair_features``), computed for a
    reference prompt exactly as ESA computes it for a user prompt: offline requirement parse, the configured
    embedder."""
    text = {n.id: n.text for n in sub.nodes}
    expert_nodes = sorted(set(graph.cap_pairs[0].tolist()))
    prompt_nodes = sorted(set(graph.cap_pairs[1].tolist()))
    texts = [text.get(graph.node_ids[p], "") or graph.node_ids[p] for p in prompt_nodes]
    queries = dict(zip(prompt_nodes, Query.build_many(get_embedder(settings), texts,
                                                      [parse_offline(t) for t in texts]), strict=True))
    with store_session(settings) as store:
        experts = {e: store.get_expert(graph.node_ids[e]) for e in expert_nodes}
    rows = [queries[p].pair_features(experts[e]) for e, p in graph.cap_pairs.t().tolist()]
    features = torch.tensor(rows, dtype=torch.float32).reshape(len(rows), len(PAIR_FEATURES))
    return replace(graph, cap_features=features)


SMALL_GRAPH_NODES = 5000  # below this, one intra-op thread is faster (and immune to CPU contention)


@contextmanager
def _threads_for(n_nodes: int) -> Iterator[None]:
    previous = torch.get_num_threads()
    if n_nodes < SMALL_GRAPH_NODES:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def fit(
    graph: GraphTensors,
    config: VGAEConfig,
    epochs: int = 200,
    seed: int = 0,
    progress: Callable[[int, int, float], None] | None = None,
) -> tuple[BetaVGAE, dict[str, Any]]:
    """Train a fresh ``BetaVGAE`` on ``graph``; deterministic for a fixed ``seed``."""
    with _threads_for(len(graph.node_ids)):
        return _fit(graph, config, epochs, seed, progress)


def _fit(
    graph: GraphTensors,
    config: VGAEConfig,
    epochs: int,
    seed: int,
    progress: Callable[[int, int, float], None] | None,
) -> tuple[BetaVGAE, dict[str, Any]]:
    if epochs < 1:
        raise DiffGraphError("epochs must be at least 1")
    prompts = torch.unique(graph.cap_pairs[1])
    if not len(prompts):
        raise DiffGraphError("the graph has no CAPABILITY edges to train on")
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    perm = prompts[torch.randperm(len(prompts), generator=gen)]
    n_val = int(round(VAL_FRACTION * len(prompts))) if len(prompts) >= MIN_PROMPTS_FOR_VAL else 0
    val, train = perm[:n_val], perm[n_val:]
    n_target = max(1, int(round(TARGET_FRACTION * len(train))))

    model = BetaVGAE.from_config(config)
    opt = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY)
    n_nodes = len(graph.node_ids)
    started = time.perf_counter()
    loss_value = nll_value = float("nan")
    for epoch in range(epochs):
        model.train()
        target = train[torch.randperm(len(train), generator=gen)[:n_target]]
        mask = _prompt_mask(n_nodes, target)
        edge_index, edge_weight = graph.message_edges(mask)
        latent = model.encode(graph.x, edge_index, edge_weight)
        sel = mask[graph.cap_pairs[1]]
        params = model.decode(latent.z, graph.cap_pairs[:, sel], graph.pair_features(sel))
        nll = model.beta_nll(params, graph.cap_scores[sel])
        loss = nll + KL_WEIGHT * model.kl_loss(latent.mu, latent.logstd) / n_nodes
        opt.zero_grad()
        loss.backward()
        opt.step()
        loss_value, nll_value = float(loss.detach()), float(nll.detach())
        if progress is not None:
            progress(epoch + 1, epochs, loss_value)
    seconds = time.perf_counter() - started
    metrics: dict[str, Any] = {
        "epochs": epochs,
        "seed": seed,
        "train_loss": loss_value,
        "train_nll": nll_value,
        "seconds": seconds,
        "seconds_per_epoch": seconds / epochs,
        "n_train_prompts": int(len(train)),
        "n_val_prompts": int(len(val)),
    }
    metrics.update({f"val_{k}": v for k, v in evaluate(model, graph, val).items()})
    model.eval()
    return model, metrics


def fingerprint(graph: GraphTensors) -> str:
    """A digest of the training data (node ids, capability pairs and scores)."""
    h = hashlib.sha256()
    h.update("\n".join(graph.node_ids).encode())
    h.update(graph.cap_pairs.numpy().tobytes())
    h.update(graph.cap_scores.numpy().tobytes())
    return h.hexdigest()[:16]


def train_planner(
    settings: Settings,
    epochs: int = 200,
    seed: int = 0,
    progress: Callable[[int, int, float], None] | None = None,
) -> TrainResult:
    """Train the VGAE on the calibrated graph, save ``<data_dir>/planner/vgae-<version>.pt`` and register a
    ``PlannerModel`` row. Raises ``DiffGraphError`` when there is nothing calibrated to train on."""
    started = time.perf_counter()
    sub = load_training_graph(settings)
    graph = with_pair_features(settings, sub, to_tensors(sub))
    config = VGAEConfig(in_dim=int(graph.x.shape[1]), pair_dim=len(PAIR_FEATURES))
    model, metrics = fit(graph, config, epochs=epochs, seed=seed, progress=progress)
    n_experts = sum(1 for n in sub.nodes if n.node_type in ("checkpoint", "lora"))
    n_prompts = sum(1 for n in sub.nodes if n.node_type == "refprompt")
    metrics.update(
        {
            "target": "solo",
            "data_fingerprint": fingerprint(graph),
            "n_experts": n_experts,
            "n_prompts": n_prompts,
            "n_capability_edges": int(len(graph.cap_scores)),
        }
    )
    metrics = {k: (None if isinstance(v, float) and np.isnan(v) else v) for k, v in metrics.items()}
    version = f"{utcnow():%Y%m%dT%H%M%S%f}-s{seed}"
    path, model_id = save_checkpoint(settings, version, model, config, metrics)
    log.info("planner model %s trained in %.1fs: %s", version, time.perf_counter() - started, metrics)
    return TrainResult(
        version=version,
        path=path,
        model_id=model_id,
        epochs=epochs,
        seed=seed,
        n_experts=n_experts,
        n_prompts=n_prompts,
        n_edges=int(len(graph.cap_scores)),
        seconds=time.perf_counter() - started,
        metrics=metrics,
    )
