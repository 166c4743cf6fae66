"""A typed activated subgraph and its export to PyTorch Geometric.

Node features: ``[text embedding | node-type one-hot | family one-hot | popularity]``.
Edge features: ``[score | is CAPABILITY | is SIMILAR_TO | is PROMPT_SIMILAR]``; every edge is exported in
both directions so a GCN sees it from either end.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from core.families import ARCHS, arch_of

if TYPE_CHECKING:
    from torch_geometric.data import Data

NODE_TYPES = ("checkpoint", "lora", "refprompt", "prompt")
FAMILIES = ARCHS  # one-hot by architecture: a Pony expert is an SDXL network (core.families)
EDGE_TYPES = ("CAPABILITY", "SIMILAR_TO", "PROMPT_SIMILAR")
PROMPT_NODE_ID = "prompt:query"


@dataclass(frozen=True)
class SubgraphNode:
    id: str
    node_type: str  # one of NODE_TYPES (adapter kinds all map to "lora")
    text: str = ""  # expert name or prompt text
    family: str = ""
    popularity: float = 0.0
    category: str = ""  # reference-prompt category


@dataclass(frozen=True)
class SubgraphEdge:
    src: str
    dst: str
    type: str  # one of EDGE_TYPES
    score: float = 0.0
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class Subgraph:
    """Nodes, edges and one embedding row per node (``embeddings[i]`` belongs to ``nodes[i]``)."""

    nodes: list[SubgraphNode]
    edges: list[SubgraphEdge]
    embeddings: np.ndarray
    prompt_node: str | None = None

    def __post_init__(self) -> None:
        self.embeddings = np.asarray(self.embeddings, dtype=np.float32).reshape(len(self.nodes), -1)

    @property
    def index(self) -> dict[str, int]:
        return {n.id: i for i, n in enumerate(self.nodes)}

    def node_ids(self, node_type: str) -> list[str]:
        return [n.id for n in self.nodes if n.node_type == node_type]

    def with_prompt(
        self, text: str, embedding: Sequence[float] | np.ndarray, k: int = 8, min_score: float = 0.0
    ) -> Subgraph:
        """Append the user prompt as a node linked to its ``k`` most similar reference prompts."""
        emb = np.asarray(embedding, dtype=np.float32).reshape(-1)
        if self.embeddings.size and emb.shape[0] != self.embeddings.shape[1]:
            raise ValueError(
                f"prompt embedding has {emb.shape[0]} dims, the graph's have {self.embeddings.shape[1]}"
            )
        emb = emb / max(float(np.linalg.norm(emb)), 1e-12)
        ref_idx = [i for i, n in enumerate(self.nodes) if n.node_type == "refprompt"]
        new_edges = list(self.edges)
        if ref_idx:
            sims = self.embeddings[ref_idx] @ emb
            order = np.argsort(-sims, kind="stable")[:k]
            for j in order:
                if sims[j] >= min_score:
                    new_edges.append(
                        SubgraphEdge(PROMPT_NODE_ID, self.nodes[ref_idx[j]].id, "PROMPT_SIMILAR", float(sims[j]))
                    )
        node = SubgraphNode(PROMPT_NODE_ID, "prompt", text=text[:2000])
        emb_rows = np.vstack([self.embeddings.reshape(len(self.nodes), -1), emb[None, :]]) if self.nodes else emb[None, :]
        return replace(self, nodes=[*self.nodes, node], edges=new_edges, embeddings=emb_rows, prompt_node=PROMPT_NODE_ID)

    def feature_matrix(self) -> np.ndarray:
        n = len(self.nodes)
        types = np.zeros((n, len(NODE_TYPES)), dtype=np.float32)
        fams = np.zeros((n, len(FAMILIES)), dtype=np.float32)
        pop = np.zeros((n, 1), dtype=np.float32)
        for i, node in enumerate(self.nodes):
            types[i, NODE_TYPES.index(node.node_type)] = 1.0
            if node.family:
                fams[i, FAMILIES.index(arch_of(node.family))] = 1.0
            pop[i, 0] = node.popularity
        return np.hstack([self.embeddings.reshape(n, -1), types, fams, pop]).astype(np.float32)

    def to_pyg(self) -> Data:
        """A ``torch_geometric.data.Data`` with ``x``, ``edge_index``, ``edge_attr``, ``node_type``,
        ``node_ids`` (list of ids in row order) and ``edge_type`` (index into ``EDGE_TYPES``)."""
        import torch
        from torch_geometric.data import Data

        idx = self.index
        src: list[int] = []
        dst: list[int] = []
        attr: list[list[float]] = []
        etype: list[int] = []
        for e in self.edges:
            if e.src not in idx or e.dst not in idx:
                continue
            one_hot = [1.0 if e.type == t else 0.0 for t in EDGE_TYPES]
            t = EDGE_TYPES.index(e.type) if e.type in EDGE_TYPES else 0
            for a, b in ((idx[e.src], idx[e.dst]), (idx[e.dst], idx[e.src])):
                src.append(a)
                dst.append(b)
                attr.append([e.score, *one_hot])
                etype.append(t)
        data = Data(
            x=torch.from_numpy(self.feature_matrix()),
            edge_index=torch.tensor([src, dst], dtype=torch.long).reshape(2, -1),
            edge_attr=torch.tensor(attr, dtype=torch.float32).reshape(-1, 1 + len(EDGE_TYPES)),
            edge_type=torch.tensor(etype, dtype=torch.long),
            node_type=torch.tensor([NODE_TYPES.index(n.node_type) for n in self.nodes], dtype=torch.long),
        )
        data.node_ids = [n.id for n in self.nodes]
        return data

    def to_dict(self) -> dict[str, Any]:
        """Plain node/edge lists (for reports and ``neo4j-viz``)."""
        return {
            "nodes": [n.__dict__ for n in self.nodes],
            "edges": [{**e.__dict__, "metrics": dict(e.metrics)} for e in self.edges],
            "prompt_node": self.prompt_node,
        }
