"""Merged-outcome search: which reference prompts it searches, and the targets it keeps (tied winners averaged)."""

from __future__ import annotations

import pytest

from planner.outcomes import relative_targets, tied_best


def test_tied_winners_are_averaged_after_group_normalisation() -> None:
    # two checkpoints then two LoRAs; two vectors tie for the best utility, one loses
    trials = [([1.0, 1.0, 1.0, 1.0], 0.5), ([1.0, 0.0, 0.2, 0.6], 0.75), ([0.5, 0.5, 0.0, 1.0], 0.75)]
    # winners normalised per group: [1, 0 | 0.25, 0.75] and [0.5, 0.5 | 0, 1]
    assert tied_best(trials, 2) == pytest.approx([0.75, 0.25, 0.125, 0.875])


def test_a_single_winner_is_its_own_normalised_vector_and_zero_groups_are_uniform() -> None:
    trials = [([1.0, 1.0, 1.0], 0.25), ([0.0, 0.0, 0.4], 1.0)]
    assert tied_best(trials, 2) == pytest.approx([0.5, 0.5, 1.0])


def test_targets_are_shares_relative_to_uniform_and_lone_experts_teach_nothing() -> None:
    kinds = {"c1": "checkpoint", "c2": "checkpoint", "l1": "lora", "l2": "lora", "l3": "lora"}
    # 2 checkpoints: uniform share 0.5 -> target 0.5; 3 LoRAs: uniform 1/3 -> 0.5 too; 0.8 of three -> clipped to 1
    got = relative_targets(["c1", "c2", "l1", "l2", "l3"], [0.75, 0.25, 0.8, 0.2, 0.0], kinds)
    assert got == [("c1", 0.75), ("c2", 0.25), ("l1", 1.0), ("l2", pytest.approx(0.3)), ("l3", 0.0)]
    uniform = relative_targets(["c1", "c2", "l1", "l2", "l3"], [0.5, 0.5, 1 / 3, 1 / 3, 1 / 3], kinds)
    assert [t for _, t in uniform] == pytest.approx([0.5] * 5)
    # a lone LoRA (share 1 whatever the merge) is left out, its checkpoints kept
    assert [e for e, _ in relative_targets(["c1", "c2", "l1"], [0.6, 0.4, 1.0], kinds)] == ["c1", "c2"]


def test_searched_prompts_are_spread_over_the_reference_set() -> None:
    from planner.outcomes import spread

    ids = list(range(60))  # grouped by category: the first 32 would miss the last ones
    chosen = spread(ids, 32)
    assert len(chosen) == len(set(chosen)) == 32 and chosen[0] == 0 and chosen[-1] >= 55
    assert spread(ids, 60) == ids and spread(ids, 100) == ids and spread(ids, 1) == [0]
