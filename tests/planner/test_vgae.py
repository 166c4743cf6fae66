"""The VGAE model on plain tensors (identity encoder, hand-computed values) and its training on a planted
graph stored in the real embedded store."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from graphdb.store import store_session
from planner.coefficients import predict_beta
from planner.graph import link_ref_prompts, to_tensors
from planner.train import fit, load_training_graph, spearman, train_planner
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
    rhos = []
    for ci, category in enumerate(planted["categories"]):
        for text in planted["held_out"][category]:
            betas = predict_beta(ckpt.model, sub, text, embedder.encode([text])[0], ids)
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
    g = to_tensors(sub)
    with torch.no_grad():
        z = loaded.model.encode(g.x, g.edge_index, g.edge_weight).mu
        assert torch.isfinite(loaded.model.decode(z, g.cap_pairs).mean).all()


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
