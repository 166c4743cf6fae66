"""From an activated ``Subgraph`` to the tensors the VGAE trains and infers on.

Training and inference see the same kind of graph: reference prompts are linked to their ``REF_KNN`` most
similar reference prompts (``PROMPT_SIMILAR``), exactly as the user-prompt node is linked to them by
``Subgraph.with_prompt``. A reference prompt whose CAPABILITY edges are masked therefore looks like a
user prompt, which is what lets the decoder generalise from masked training prompts to new prompts.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import Tensor

from graphdb.subgraph import EDGE_TYPES, Subgraph, SubgraphEdge

REF_KNN = 5
SMALL_GEMM = 512
CAPABILITY = EDGE_TYPES.index("CAPABILITY")
CAPABILITY_WEIGHT_FLOOR = 0.05  # a zero score is still evidence of a measured edge


def link_ref_prompts(sub: Subgraph, k: int = REF_KNN) -> Subgraph:
    """Add ``PROMPT_SIMILAR`` edges from each reference prompt to its ``k`` nearest reference prompts."""
    ref = [i for i, n in enumerate(sub.nodes) if n.node_type == "refprompt"]
    if len(ref) < 2:
        return sub
    emb = sub.embeddings[ref]
    # A small BLAS gemm wakes every OpenBLAS thread; on a busy box that costs ~40 ms instead of 0.3 ms.
    sims = np.einsum("id,jd->ij", emb, emb) if len(ref) <= SMALL_GEMM else emb @ emb.T
    np.fill_diagonal(sims, -np.inf)
    edges = list(sub.edges)
    for row, i in enumerate(ref):
        for col in np.argsort(-sims[row], kind="stable")[: min(k, len(ref) - 1)]:
            edges.append(
                SubgraphEdge(sub.nodes[i].id, sub.nodes[ref[col]].id, "PROMPT_SIMILAR", float(sims[row, col]))
            )
    return replace(sub, edges=edges)


@dataclass
class GraphTensors:
    """Node features, message-passing edges and the CAPABILITY targets of one graph."""

    x: Tensor
    edge_index: Tensor  # both directions of every edge
    edge_weight: Tensor
    edge_type: Tensor
    node_ids: list[str]
    cap_pairs: Tensor  # (2, m): expert node -> reference-prompt node
    cap_scores: Tensor  # (m,)
    cap_features: Tensor | None = None  # (m, pair_dim): each target pair's evidence, when the decoder reads it

    def pair_features(self, sel: Tensor) -> Tensor | None:
        """The evidence of the target pairs selected by ``sel`` (``None`` when the graph carries none)."""
        return None if self.cap_features is None else self.cap_features[sel]

    @property
    def index(self) -> dict[str, int]:
        return {n: i for i, n in enumerate(self.node_ids)}

    def message_edges(self, masked_prompts: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Edges for message passing, without the CAPABILITY edges touching ``masked_prompts`` (bool mask)."""
        if masked_prompts is None:
            return self.edge_index, self.edge_weight
        touches = masked_prompts[self.edge_index[0]] | masked_prompts[self.edge_index[1]]
        keep = ~((self.edge_type == CAPABILITY) & touches)
        return self.edge_index[:, keep], self.edge_weight[keep]


def to_tensors(sub: Subgraph) -> GraphTensors:
    """Export ``sub`` through ``Subgraph.to_pyg`` and collect its CAPABILITY edges as training targets."""
    data = sub.to_pyg()
    score = data.edge_attr[:, 0] if data.edge_attr.numel() else torch.zeros(0)
    weight = torch.where(
        data.edge_type == CAPABILITY, score.clamp(0.0, 1.0) + CAPABILITY_WEIGHT_FLOOR, score.clamp(min=0.0)
    )
    idx = {n: i for i, n in enumerate(data.node_ids)}
    pairs = [
        (idx[e.src], idx[e.dst], e.score)
        for e in sub.edges
        if e.type == "CAPABILITY" and e.src in idx and e.dst in idx
    ]
    return GraphTensors(
        x=data.x,
        edge_index=data.edge_index,
        edge_weight=weight.float(),
        edge_type=data.edge_type,
        node_ids=list(data.node_ids),
        cap_pairs=torch.tensor([[p[0] for p in pairs], [p[1] for p in pairs]], dtype=torch.long).reshape(
            2, -1
        ),
        cap_scores=torch.tensor([p[2] for p in pairs], dtype=torch.float32),
    )
