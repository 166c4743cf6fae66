"""Merged-outcome search: which reference prompts it searches, and the targets it keeps (tied winners averaged)."""

from __future__ import annotations

import pytest

from planner.outcomes import tied_best


def test_tied_winners_are_averaged_after_group_normalisation() -> None:
    # two checkpoints then two LoRAs; two vectors tie for the best utility, one loses
    trials = [([1.0, 1.0, 1.0, 1.0], 0.5), ([1.0, 0.0, 0.2, 0.6], 0.75), ([0.5, 0.5, 0.0, 1.0], 0.75)]
    # winners normalised per group: [1, 0 | 0.25, 0.75] and [0.5, 0.5 | 0, 1]
    assert tied_best(trials, 2) == pytest.approx([0.75, 0.25, 0.125, 0.875])


def test_a_single_winner_is_its_own_normalised_vector_and_zero_groups_are_uniform() -> None:
    trials = [([1.0, 1.0, 1.0], 0.25), ([0.0, 0.0, 0.4], 1.0)]
    assert tied_best(trials, 2) == pytest.approx([0.5, 0.5, 1.0])



def test_searched_prompts_are_spread_over_the_reference_set() -> None:
    from planner.outcomes import spread

    ids = list(range(60))  # grouped by category: the first 32 would miss the last ones
    chosen = spread(ids, 32)
    assert len(chosen) == len(set(chosen)) == 32 and chosen[0] == 0 and chosen[-1] >= 55
    assert spread(ids, 60) == ids and spread(ids, 100) == ids and spread(ids, 1) == [0]
