"""Merged-outcome search: which reference prompts it searches, and the targets it keeps (tied winners averaged)."""

from __future__ import annotations

import pytest

from planner.outcomes import relative_targets, tied_best


def test_tied_winners_are_averaged_as_the_merges_used_them() -> None:
    # two checkpoints then two LoRAs; two vectors tie for the best utility, one loses
    trials = [([1.0, 1.0, 1.0, 1.0], 0.5), ([0.8, 0.0, 0.2, 0.6], 0.75), ([0.4, 0.6, 0.0, 1.0], 0.75)]
    # checkpoint values are scales (kept), LoRA values shares (normalised): [0.8, 0 | 0.25, 0.75], [0.4, 0.6 | 0, 1]
    assert tied_best(trials, 2) == pytest.approx([0.6, 0.3, 0.125, 0.875])


def test_a_single_winner_is_its_own_vector_and_an_all_zero_lora_group_is_uniform() -> None:
    trials = [([1.0, 1.0, 1.0, 1.0], 0.25), ([0.0, 0.3, 0.0, 0.0], 1.0)]
    assert tied_best(trials, 2) == pytest.approx([0.0, 0.3, 0.5, 0.5])


def test_checkpoint_scales_are_targets_and_lora_shares_are_relative_to_uniform() -> None:
    kinds = {"c1": "checkpoint", "c2": "checkpoint", "l1": "lora", "l2": "lora", "l3": "lora"}
    # checkpoints: the scale as it is; 3 LoRAs: uniform 1/3 -> 0.5, 0.8 -> clipped to 1
    got = relative_targets(["c1", "c2", "l1", "l2", "l3"], [0.9, 0.25, 0.8, 0.2, 0.0], kinds)
    assert got == [("c1", 0.9), ("c2", 0.25), ("l1", 1.0), ("l2", pytest.approx(0.3)), ("l3", 0.0)]
    uniform = relative_targets(["l1", "l2"], [0.5, 0.5], kinds)
    assert [t for _, t in uniform] == pytest.approx([0.5, 0.5])
    # a lone LoRA (share 1 whatever the merge) is left out; a lone checkpoint's scale still teaches
    assert relative_targets(["c1", "l1"], [0.7, 1.0], kinds) == [("c1", 0.7)]


def test_searched_prompts_are_spread_over_the_reference_set() -> None:
    from planner.outcomes import spread

    ids = list(range(60))  # grouped by category: the first 32 would miss the last ones
    chosen = spread(ids, 32)
    assert len(chosen) == len(set(chosen)) == 32 and chosen[0] == 0 and chosen[-1] >= 55
    assert spread(ids, 60) == ids and spread(ids, 100) == ids and spread(ids, 1) == [0]


def test_the_search_merges_checkpoint_values_as_scales_and_lora_values_as_shares() -> None:
    from core.types import ExpertKind, MergePlan, PlannedExpert
    from planner.swarms import plan_with_values

    def expert(i: int, kind: ExpertKind) -> PlannedExpert:
        return PlannedExpert(expert_id=f"e{i}", kind=kind, coefficient=0.0)

    plan = MergePlan(checkpoints=[expert(0, ExpertKind.checkpoint), expert(1, ExpertKind.checkpoint)],
                     loras=[expert(2, ExpertKind.lora), expert(3, ExpertKind.lora)])
    values = [0.8, 0.4, 0.3, 0.1]
    scaled = plan_with_values(plan, values, lora_max_weight=0.8, absolute_checkpoints=True)
    assert [e.coefficient for e in scaled.checkpoints] == pytest.approx([0.8, 0.4])  # vgae's reading
    assert [e.coefficient for e in scaled.loras] == pytest.approx([0.6, 0.2])  # shares of 0.8
    shared = plan_with_values(plan, values, lora_max_weight=0.8, lora_caps=[0.5, None])
    assert [e.coefficient for e in shared.checkpoints] == pytest.approx([2 / 3, 1 / 3])  # fixed's reading
    assert [e.coefficient for e in shared.loras] == pytest.approx([0.5, 0.2])  # capped at its recommended weight
