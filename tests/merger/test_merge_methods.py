"""Each merge method equals its formula on small hand-computed tensors."""

from __future__ import annotations

import pytest
import torch

from merger.errors import MergeError
from merger.merge import dare_keep_mask, merge_tensor, trim_top_k, validate

BASE = torch.tensor([1.0, 2.0, 3.0, 4.0])
E1 = torch.tensor([2.0, 2.0, 1.0, 8.0])  # τ1 = [ 1, 0, -2,  4]
E2 = torch.tensor([0.0, 5.0, 3.0, 2.0])  # τ2 = [-1, 3,  0, -2]


def test_task_arithmetic() -> None:
    out = merge_tensor("task_arithmetic", BASE, [E1, E2], [0.5, 0.25])
    assert torch.equal(out, torch.tensor([1.25, 2.75, 2.0, 5.5]))
    assert torch.equal(merge_tensor("task_arithmetic", BASE, [E1], [1.0]), E1)  # weight 1 swaps the expert in


def test_weighted_average_blends_base_below_one() -> None:
    # Σw = 0.75 → 0.25·base + 0.5·E1 + 0.25·E2
    out = merge_tensor("weighted_average", BASE, [E1, E2], [0.5, 0.25])
    assert torch.equal(out, torch.tensor([1.25, 2.75, 2.0, 5.5]))


def test_weighted_average_normalises_at_or_above_one() -> None:
    out = merge_tensor("weighted_average", BASE, [E1, E2], [1.0, 3.0])  # (E1 + 3·E2) / 4
    assert torch.equal(out, torch.tensor([0.5, 4.25, 2.5, 3.5]))


def test_trim_top_k() -> None:
    assert torch.equal(trim_top_k(torch.tensor([1.0, 0.0, -2.0, 4.0]), 0.5), torch.tensor([0.0, 0.0, -2.0, 4.0]))
    assert torch.equal(trim_top_k(torch.tensor([1.0, -3.0, 2.0]), 1.0), torch.tensor([1.0, -3.0, 2.0]))
    assert torch.equal(trim_top_k(torch.tensor([1.0, -3.0, 2.0]), 0.3), torch.tensor([0.0, -3.0, 0.0]))


def test_ties_trim_elect_disjoint_mean() -> None:
    # trimmed τ1 = [0,0,-2,4], τ2 = [0,3,0,-2]; sum [0,3,-2,2] → γ = [0,+,-,+]
    # → deltas [0, 3, -2, 4] (τ2's -2 at index 3 disagrees and is dropped)
    out = merge_tensor("ties", BASE, [E1, E2], [1.0, 1.0], density=0.5)
    assert torch.equal(out, torch.tensor([1.0, 5.0, 1.0, 8.0]))


def test_ties_weights_scale_before_election() -> None:
    # w = [0.5, 1]: [0,0,-1,2] + [0,3,0,-2] → γ = [0,+,-,0]; index 3 cancels to no change;
    # index 2: only expert 1 agrees, −1 / 0.5 = −2 (divided by the agreeing weight, as mergekit does)
    out = merge_tensor("ties", BASE, [E1, E2], [0.5, 1.0], density=0.5)
    assert torch.equal(out, torch.tensor([1.0, 5.0, 1.0, 4.0]))


def test_ties_divides_by_the_agreeing_weight_not_the_count() -> None:
    # w = [0.25, 0.75], no trim: index 0 both agree → (0.25·2 + 0.75·4) / 1 = 3.5; index 1: γ = sgn(−0.25 + 0.75)
    # → only expert 2 agrees → 0.75·1 / 0.75 = 1
    base = torch.zeros(2)
    out = merge_tensor("ties", base, [torch.tensor([2.0, -1.0]), torch.tensor([4.0, 1.0])], [0.25, 0.75],
                       density=1.0)
    assert torch.allclose(out, torch.tensor([3.5, 1.0]))


def test_ties_matches_sd_mecha() -> None:
    """Equal weights summing to 1 against sd-mecha's ``ties_sum`` (TIES-Merging, arXiv:2306.01708) with the
    sign elected by the summed deltas; density 1 because sd-mecha's top-k keeps ties at the threshold."""
    from sd_mecha.extensions.builtin.merge_methods.ties import ties_sum

    gen = torch.Generator().manual_seed(0)
    base = torch.randn(64, 32, generator=gen)
    experts = [base + torch.randn(64, 32, generator=gen) for _ in range(3)]
    ours = merge_tensor("ties", base, experts, [1 / 3] * 3, density=1.0)
    theirs = base + ties_sum.__wrapped__(*[x - base for x in experts], k=1.0, vote_sgn=True)
    assert torch.allclose(ours, theirs, atol=1e-5)
    # the old count-divided formula was 1/3 of this delta: make sure the comparison would see it
    assert not torch.allclose(base + (ours - base) / 3, theirs, atol=1e-2)


def test_ties_averages_agreeing_entries() -> None:
    base = torch.zeros(3)
    out = merge_tensor("ties", base, [torch.tensor([2.0, -1.0, 4.0]), torch.tensor([4.0, 1.0, 2.0])], [1.0, 1.0],
                       density=1.0)
    assert torch.equal(out, torch.tensor([3.0, 0.0, 3.0]))


def test_dare_drops_and_rescales_with_seeded_masks() -> None:
    key = "model.diffusion_model.x"
    m1 = dare_keep_mask(7, 0, key, (4,), 0.5)
    m2 = dare_keep_mask(7, 1, key, (4,), 0.5)
    expected = BASE + (0.5 / 0.5) * (E1 - BASE) * m1 + (0.25 / 0.5) * (E2 - BASE) * m2
    out = merge_tensor("dare", BASE, [E1, E2], [0.5, 0.25], density=0.5, seed=7, key=key)
    assert torch.equal(out, expected)
    again = merge_tensor("dare", BASE, [E1, E2], [0.5, 0.25], density=0.5, seed=7, key=key)
    assert torch.equal(out, again)


def test_dare_mask_rate_and_seeding() -> None:
    mask = dare_keep_mask(0, 0, "k", (20000,), 0.3)
    assert 0.28 < mask.float().mean().item() < 0.32
    assert torch.equal(mask, dare_keep_mask(0, 0, "k", (20000,), 0.3))
    assert not torch.equal(mask, dare_keep_mask(1, 0, "k", (20000,), 0.3))
    assert not torch.equal(mask, dare_keep_mask(0, 0, "other", (20000,), 0.3))


def test_dare_density_one_is_task_arithmetic() -> None:
    out = merge_tensor("dare", BASE, [E1, E2], [0.5, 0.25], density=1.0, seed=3, key="k")
    assert torch.equal(out, merge_tensor("task_arithmetic", BASE, [E1, E2], [0.5, 0.25]))


@pytest.mark.parametrize(
    ("method", "weights", "density", "dtype", "match"),
    [
        ("soup", [1.0], 0.5, "fp16", "unknown merge method"),
        ("ties", [1.0], 0.0, "fp16", "density"),
        ("ties", [1.0], 0.5, "int8", "dtype"),
        ("task_arithmetic", [float("nan")], 0.5, "fp16", "finite"),
        ("weighted_average", [-1.0], 0.5, "fp16", "non-negative"),
    ],
)
def test_validate_rejects(method, weights, density, dtype, match) -> None:
    with pytest.raises(MergeError, match=match):
        validate(method, weights, density, dtype)
