"""The VGAE model on plain tensors (identity encoder, hand-computed values) and its training on a planted
graph stored in the real embedded store."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from graphdb.store import store_session
from planner.coefficients import predict_beta
from planner.graph import GraphTensors, link_ref_prompts, to_tensors
from planner.parse import parse_offline
from planner.retrieval import PAIR_FEATURES, Query
from planner.train import fit, load_training_graph, spearman, train_planner, with_pair_features
from planner.vgae import EPS, BetaDecoder, BetaParams, BetaVGAE, VGAEConfig
from planner.vgae_checkpoints import latest_checkpoint, load_checkpoint
from tests.planner.graphs import build_planted_graph, planted_truth


def _identity_vgae(latent: int = 2) -> BetaVGAE:
    def encoder(x, edge_index, edge_weight=None):
        return x, torch.full_like(x, -1.0)

    return BetaVGAE(encoder, BetaDecoder(latent, 4))


def test_beta_moments_match_the_closed_form() -> None:
    p = BetaParams(torch.tensor([2.0, 1.0]), torch.tensor([3.0, 1.0]))
    assert torch.allclose(p.mean, torch.tensor([0.4, 0.5]))
    assert torch.allclose(p.var, torch.tensor([6 / (25 * 6), 1 / (4 * 3)]))
    assert torch.allclose(p.std, p.var.sqrt())


def test_beta_nll_is_the_negative_log_density() -> None:
    p = BetaParams(torch.tensor([2.0]), torch.tensor([2.0]))
    # Beta(2, 2) density at 0.5 is 6 * 0.5 * 0.5 = 1.5
    assert BetaVGAE.beta_nll(p, torch.tensor([0.5])).item() == pytest.approx(-math.log(1.5), abs=1e-5)
    # targets at the boundary are clamped into (EPS, 1 - EPS) instead of giving inf
    assert torch.isfinite(BetaVGAE.beta_nll(p, torch.tensor([0.0, 1.0])))
    assert BetaVGAE.beta_nll(p, torch.tensor([0.0])).item() == pytest.approx(
        -math.log(6 * EPS * (1 - EPS)), rel=1e-3
    )


def test_kl_is_zero_at_the_prior_and_positive_elsewhere() -> None:
    model = _identity_vgae()
    zeros = torch.zeros(3, 2)
    assert model.kl_loss(zeros, zeros).item() == pytest.approx(0.0)
    # one node, one dim: mu=1, logstd=0 -> 0.5 * mu^2 = 0.5
    assert model.kl_loss(torch.ones(1, 1), torch.zeros(1, 1)).item() == pytest.approx(0.5)


def test_encode_returns_statistics_instead_of_stashing_them() -> None:
    model = _identity_vgae().eval()
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    latent = model.encode(x, torch.zeros(2, 0, dtype=torch.long))
    assert torch.equal(latent.z, x) and torch.equal(latent.mu, x)  # eval: z is the mean
    assert torch.equal(latent.logstd, torch.full_like(x, -1.0))
    assert not hasattr(model, "__mu__") and not hasattr(model, "_VGAE__mu__")
    model.train()
    torch.manual_seed(0)
    assert not torch.equal(model.encode(x, torch.zeros(2, 0, dtype=torch.long)).z, x)  # sampled


def test_decoder_gives_positive_parameters_per_pair() -> None:
    model = _identity_vgae()
    z = torch.randn(5, 2)
    params = model.decode(z, torch.tensor([[0, 1, 2], [4, 4, 3]]))
    assert params.alpha.shape == (3,) and bool((params.alpha > 0).all()) and bool((params.beta > 0).all())
    # the pair order matters: (expert, prompt) features are [z_e, z_p, z_e * z_p]
    swapped = model.decode(z, torch.tensor([[4, 4, 3], [0, 1, 2]]))
    assert not torch.allclose(params.alpha, swapped.alpha)


@pytest.fixture
def planted(settings, embedder):
    return build_planted_graph(settings, embedder, seed=0)


def test_vgae_learns_planted_structure(settings, embedder, planted) -> None:
    """Experts strong in category X must rank highest for held-out X prompts (graph structure only:
    expert skill texts are uninformative)."""
    result = train_planner(settings, epochs=200, seed=0)
    assert (
        result.path.name == f"vgae-{result.version}.pt"
        and result.path.parent == settings.data_dir / "planner"
    )
    assert result.n_experts == 12 and result.n_prompts == 24 and result.n_edges == 288
    ckpt = latest_checkpoint(settings)
    assert ckpt is not None and ckpt.version == result.version
    ids = [e.id for e in planted["experts"]]
    with store_session(settings) as store:
        sub = store.activate_subgraph(ids)
    assert ckpt.config.pair_dim == len(PAIR_FEATURES)
    rhos = []
    for ci, category in enumerate(planted["categories"]):
        for text in planted["held_out"][category]:
            query = Query.build(embedder, text, parse_offline(text))
            features = {e.id: query.pair_features(e) for e in planted["experts"]}
            betas = predict_beta(ckpt.model, sub, text, query.prompt_vec, ids, features)
            predicted = [betas[i].mean for i in ids]
            truth = [planted_truth(k, ci) for k in range(len(ids))]
            rhos.append(spearman(predicted, truth))
            top3 = {ids[j] for j in np.argsort(predicted)[-3:]}
            assert top3 == set(ids[3 * ci : 3 * ci + 3]), (category, text)
    assert min(rhos) >= 0.8, rhos


def test_training_is_seeded_and_the_checkpoint_round_trips(settings, embedder, planted) -> None:
    graph = to_tensors(load_training_graph(settings))
    config = VGAEConfig(in_dim=int(graph.x.shape[1]))
    a, metrics_a = fit(graph, config, epochs=5, seed=3)
    b, metrics_b = fit(graph, config, epochs=5, seed=3)
    c, _ = fit(graph, config, epochs=5, seed=4)
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key])
    assert metrics_a["train_loss"] == metrics_b["train_loss"]
    assert any(not torch.equal(v, c.state_dict()[k]) for k, v in a.state_dict().items())

    result = train_planner(settings, epochs=3, seed=1)
    blob = torch.load(result.path, weights_only=True)
    assert set(blob) >= {"state_dict", "config", "metrics", "version"}
    assert blob["metrics"]["data_fingerprint"] == result.metrics["data_fingerprint"]
    loaded = load_checkpoint(result.path)
    sub = link_ref_prompts(load_training_graph(settings))
    g = with_pair_features(settings, sub, to_tensors(sub))
    assert loaded.config.pair_dim == len(PAIR_FEATURES) and g.cap_features.shape == (288, len(PAIR_FEATURES))
    with torch.no_grad():
        z = loaded.model.encode(g.x, g.edge_index, g.edge_weight).mu
        assert torch.isfinite(loaded.model.decode(z, g.cap_pairs, g.cap_features).mean).all()


def test_training_without_calibration_is_a_clear_error(settings, embedder) -> None:
    from core.types import DiffGraphError

    with pytest.raises(DiffGraphError, match="no calibrated experts"):
        train_planner(settings, epochs=1)


def test_gcn_encoder_variant_and_config_round_trip() -> None:
    config = VGAEConfig(in_dim=6, hidden=8, latent=4, decoder_hidden=8, conv="gcn")
    assert VGAEConfig.from_dict(config.to_dict()) == config
    model = BetaVGAE.from_config(config).eval()
    x = torch.randn(4, 6)
    edge_index = torch.tensor([[0, 1, 2], [3, 3, 3]])
    params = model(x, edge_index, torch.tensor([[0, 1], [3, 3]]), torch.ones(3))
    assert params.alpha.shape == (2,) and bool((params.mean > 0).all() and (params.mean < 1).all())
    with pytest.raises(ValueError, match="unknown encoder convolution"):
        BetaVGAE.from_config(VGAEConfig(in_dim=6, conv="gat"))


def test_decoder_reads_the_pair_evidence_it_was_built_for() -> None:
    decoder = BetaDecoder(2, 4, pair_dim=3)
    z, pairs = torch.randn(4, 2), torch.tensor([[0, 1], [3, 3]])
    a = decoder(z, pairs, torch.tensor([[0.1, 0.2, 0.0], [0.1, 0.2, 0.0]]))
    b = decoder(z, pairs, torch.tensor([[0.1, 0.2, 1.0], [0.1, 0.2, 1.0]]))
    assert not torch.allclose(a.alpha, b.alpha)
    with pytest.raises(ValueError, match="pair features"):
        decoder(z, pairs)
    with pytest.raises(ValueError, match="pair features"):
        decoder(z, pairs, torch.zeros(2, 2))


def test_checkpoints_from_before_pair_evidence_still_load() -> None:
    config = VGAEConfig.from_dict({"in_dim": 6, "hidden": 8, "latent": 4, "decoder_hidden": 8, "conv": "sage"})
    assert config.pair_dim == 0
    model = BetaVGAE.from_config(config).eval()
    z = model.encode(torch.randn(3, 6), torch.tensor([[0, 1], [1, 2]])).mu
    assert model.decode(z, torch.tensor([[0], [2]])).alpha.shape == (1,)


def test_the_decoder_learns_what_the_pair_evidence_says() -> None:
    """Targets depend only on a pair's trigger-hit feature (node features and edges are noise): a fitted
    model must rank a hit above a miss for prompts it never trained on. Fails if the evidence is ignored."""
    gen = torch.Generator().manual_seed(0)
    n_experts, n_prompts = 6, 40
    n = n_experts + n_prompts
    pairs = torch.tensor([[e, n_experts + p] for p in range(n_prompts) for e in range(n_experts)]).t()
    hit = (torch.rand(pairs.shape[1], generator=gen) < 0.4).float()
    cosines = torch.rand(pairs.shape[1], 2, generator=gen)
    graph = GraphTensors(
        x=torch.randn(n, 8, generator=gen),
        edge_index=torch.cat([pairs, pairs.flip(0)], dim=1),
        edge_weight=torch.rand(2 * pairs.shape[1], generator=gen),
        edge_type=torch.zeros(2 * pairs.shape[1], dtype=torch.long),
        node_ids=[f"n{i}" for i in range(n)],
        cap_pairs=pairs,
        cap_scores=0.25 + 0.5 * hit,
        cap_features=torch.cat([cosines, hit[:, None]], dim=1),
    )
    model, metrics = fit(graph, VGAEConfig(in_dim=8, pair_dim=3), epochs=150, seed=0)
    assert metrics["n_val_prompts"] == 8
    with torch.no_grad():
        z = model.encode(graph.x, graph.edge_index, graph.edge_weight).mu
        new = torch.tensor([[e for e in range(n_experts)], [n - 1] * n_experts])
        f = torch.full((n_experts, 3), 0.5)
        miss = model.decode(z, new, f.index_put((torch.arange(n_experts), torch.tensor(2)), torch.tensor(0.0)))
        hits = model.decode(z, new, f.index_put((torch.arange(n_experts), torch.tensor(2)), torch.tensor(1.0)))
    assert bool((hits.mean > miss.mean + 0.2).all()), (hits.mean, miss.mean)
    assert metrics["val_mae"] < 0.15
