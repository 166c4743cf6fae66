"""The planner's model: a variational graph autoencoder (PyG ``VGAE``) with a Beta decoder head.

The encoder is two message-passing layers with separate ``mu``/``logstd`` heads. The default
``conv="sage"`` is GraphSAGE-style (PyG ``GraphConv`` with mean aggregation: a root weight for the node
itself plus an edge-weighted mean of its neighbours, so capability scores weight the messages);
``conv="gcn"`` uses ``GCNConv``. On the planted-structure test graph GCN's symmetric normalisation mixed
node and neighbourhood too strongly to separate experts with near-identical text, so SAGE is the default.

For an (expert, prompt) pair of node indices the decoder reads ``[z_e, z_p, z_e * z_p, f_ep]`` and outputs
the parameters of a Beta distribution over the pair's normalised capability score,

.. math::
    \\alpha, \\beta = \\operatorname{softplus}(\\mathrm{MLP}([z_e, z_p, z_e \\odot z_p, f_{ep}])) + \\epsilon,
    \\qquad \\mathbb{E}[s] = \\frac{\\alpha}{\\alpha + \\beta},\\quad
    \\operatorname{Var}[s] = \\frac{\\alpha\\beta}{(\\alpha+\\beta)^2(\\alpha+\\beta+1)}.

``f_ep`` is the pair's own evidence (``planner.retrieval.PAIR_FEATURES``: the expert's cosine to the prompt
and to its closest requirement term, and whether its trigger word is in the prompt; ``pair_dim`` values,
none in checkpoints trained before it existed). The node embeddings alone left the decoder blind to what
the merged-outcome search's winners have in common: a checkpoint whose trigger word is in the prompt got
1.37× its uniform share there (others 0.75×).

The Beta mean is the expert's merge coefficient, the standard deviation its uncertainty. Losses are
separate methods (``beta_nll``, ``kl_loss``); training lives in ``planner.train``. Unlike PyG's ``VGAE``,
``encode`` returns ``mu`` and ``logstd`` instead of stashing them on the module.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch_geometric.nn import GCNConv, GraphConv
from torch_geometric.nn.models import VGAE

EPS = 1e-4  # keeps alpha, beta > 0 and targets inside (0, 1)
MAX_LOGSTD = 10.0


@dataclass(frozen=True)
class VGAEConfig:
    """Architecture of a ``BetaVGAE`` (saved next to its weights)."""

    in_dim: int
    hidden: int = 64
    latent: int = 32
    decoder_hidden: int = 64
    conv: str = "sage"  # sage | gcn
    pair_dim: int = 0  # per-pair evidence features the decoder reads (0: node embeddings only)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VGAEConfig:
        keys = ("in_dim", "hidden", "latent", "decoder_hidden", "pair_dim")
        sizes = {k: int(data[k]) for k in keys if k in data}
        return cls(**sizes, conv=str(data.get("conv", "sage")))


class Latent(NamedTuple):
    z: Tensor  # sampled in training, equal to mu in eval mode
    mu: Tensor
    logstd: Tensor


class BetaParams(NamedTuple):
    alpha: Tensor
    beta: Tensor

    @property
    def mean(self) -> Tensor:
        return self.alpha / (self.alpha + self.beta)

    @property
    def var(self) -> Tensor:
        total = self.alpha + self.beta
        return self.alpha * self.beta / (total.pow(2) * (total + 1.0))

    @property
    def std(self) -> Tensor:
        return self.var.sqrt()


def _conv(kind: str, n_in: int, n_out: int) -> nn.Module:
    if kind == "sage":
        return GraphConv(n_in, n_out, aggr="mean")
    if kind == "gcn":
        return GCNConv(n_in, n_out)
    raise ValueError(f"unknown encoder convolution {kind!r}: use sage or gcn")


class GraphEncoder(nn.Module):
    """Two message-passing layers: a shared hidden layer, then separate ``mu`` and ``logstd`` heads."""

    def __init__(self, in_dim: int, hidden: int, latent: int, conv: str = "sage") -> None:
        super().__init__()
        self.conv = _conv(conv, in_dim, hidden)
        self.conv_mu = _conv(conv, hidden, latent)
        self.conv_logstd = _conv(conv, hidden, latent)

    def forward(
        self, x: Tensor, edge_index: Tensor, edge_weight: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        h = F.relu(self.conv(x, edge_index, edge_weight))
        return self.conv_mu(h, edge_index, edge_weight), self.conv_logstd(h, edge_index, edge_weight)


class BetaDecoder(nn.Module):
    """MLP over ``[z_e, z_p, z_e * z_p, f_ep]`` giving Beta parameters for each (expert, prompt) pair."""

    def __init__(self, latent: int, hidden: int, pair_dim: int = 0) -> None:
        super().__init__()
        self.pair_dim = pair_dim
        self.mlp = nn.Sequential(nn.Linear(3 * latent + pair_dim, hidden), nn.ReLU(), nn.Linear(hidden, 2))

    def forward(self, z: Tensor, pairs: Tensor, features: Tensor | None = None) -> BetaParams:
        """``pairs`` is a ``(2, m)`` long tensor of (expert node, prompt node) indices, ``features`` the
        ``(m, pair_dim)`` pair evidence (required when ``pair_dim`` > 0, ignored otherwise)."""
        z_e, z_p = z[pairs[0]], z[pairs[1]]
        parts = [z_e, z_p, z_e * z_p]
        if self.pair_dim:
            if features is None or tuple(features.shape) != (pairs.shape[1], self.pair_dim):
                got = None if features is None else tuple(features.shape)
                raise ValueError(f"the decoder needs ({pairs.shape[1]}, {self.pair_dim}) pair features, got {got}")
            parts.append(features.to(z.dtype))
        out = F.softplus(self.mlp(torch.cat(parts, dim=-1))) + EPS
        return BetaParams(out[:, 0], out[:, 1])


class BetaVGAE(VGAE):
    """PyG ``VGAE`` whose decoder predicts a Beta distribution per (expert, prompt) pair."""

    def __init__(self, encoder: nn.Module, decoder: nn.Module) -> None:
        super().__init__(encoder, decoder)

    @classmethod
    def from_config(cls, config: VGAEConfig) -> BetaVGAE:
        return cls(
            GraphEncoder(config.in_dim, config.hidden, config.latent, config.conv),
            BetaDecoder(config.latent, config.decoder_hidden, config.pair_dim),
        )

    def encode(self, x: Tensor, edge_index: Tensor, edge_weight: Tensor | None = None) -> Latent:  # type: ignore[override]
        mu, logstd = self.encoder(x, edge_index, edge_weight)
        logstd = logstd.clamp(max=MAX_LOGSTD)
        return Latent(self.reparametrize(mu, logstd), mu, logstd)

    def decode(self, z: Tensor, pairs: Tensor, features: Tensor | None = None) -> BetaParams:  # type: ignore[override]
        return self.decoder(z, pairs, features)

    def forward(
        self,
        x: Tensor,
        edge_index: Tensor,
        pairs: Tensor,
        edge_weight: Tensor | None = None,
        features: Tensor | None = None,
    ) -> BetaParams:  # type: ignore[override]
        return self.decode(self.encode(x, edge_index, edge_weight).z, pairs, features)

    @staticmethod
    def beta_nll(params: BetaParams, target: Tensor) -> Tensor:
        """Mean negative log-likelihood of ``target`` scores (clamped into ``(EPS, 1 - EPS)``)."""
        y = target.clamp(EPS, 1.0 - EPS)
        return -torch.distributions.Beta(params.alpha, params.beta).log_prob(y).mean()

    def kl_loss(self, mu: Tensor, logstd: Tensor) -> Tensor:  # type: ignore[override]
        """KL divergence of ``N(mu, exp(logstd)^2)`` from ``N(0, I)``, averaged over nodes."""
        logstd = logstd.clamp(max=MAX_LOGSTD)
        return -0.5 * torch.mean(torch.sum(1 + 2 * logstd - mu**2 - logstd.exp() ** 2, dim=1))
