"""Coefficient rules on plain values."""

from __future__ import annotations

import numpy as np
import pytest

from core.types import Expert, ExpertKind, ValidationFailed
from graphdb.store import Candidate
from planner.coefficients import (
    BetaEstimate,
    check_method,
    method_values,
    normalise_checkpoints,
    planned,
    scale_loras,
    softmax,
)
from planner.review import Choice


def _choice(eid: str, kind: str, vec: list[float]) -> Choice:
    e = Expert(id=eid, source="local", name=eid, kind=ExpertKind(kind), embedding=vec)
    return Choice(Candidate(e, 0.5), "because")


def test_checkpoint_weights_sum_to_one_and_lora_weights_stay_in_range() -> None:
    assert sum(normalise_checkpoints([0.2, 0.6, 0.2])) == pytest.approx(1.0)
    assert normalise_checkpoints([0.0, 0.0]) == [0.5, 0.5]
    assert normalise_checkpoints([-1.0, 1.0]) == [0.0, 1.0]
    assert scale_loras([0.5, 1.7, -0.2], 0.8) == pytest.approx([0.4, 0.8, 0.0])


def test_similarity_is_a_softmax_of_cosine() -> None:
    prompt = np.array([1.0, 0.0], dtype=np.float32)
    choices = [_choice("local:a", "lora", [1.0, 0.0]), _choice("local:b", "lora", [0.0, 1.0])]
    values = method_values("similarity", choices, prompt)
    assert values == pytest.approx(softmax([1.0, 0.0], 0.1))
    assert values[0] > 0.99 and sum(values) == pytest.approx(1.0)
    assert method_values("fixed", choices, prompt) == [0.5, 0.5]


def test_planned_carries_beta_parameters() -> None:
    ck = [_choice("local:a", "checkpoint", [1.0, 0.0]), _choice("local:b", "checkpoint", [0.0, 1.0])]
    betas = {"local:a": BetaEstimate(3.0, 1.0), "local:b": BetaEstimate(1.0, 1.0)}
    rows = planned(ck, "checkpoint", [betas["local:a"].mean, betas["local:b"].mean], 1.0, betas)
    assert [r.coefficient for r in rows] == pytest.approx([0.75 / 1.25, 0.5 / 1.25])
    assert rows[0].alpha == 3.0 and rows[0].beta == 1.0 and rows[0].mean == 0.75
    assert rows[0].std == pytest.approx(np.sqrt(3 / (16 * 5)), abs=1e-6)
    assert rows[0].reason == "because" and rows[0].path is None


def test_unknown_method_is_rejected() -> None:
    assert check_method("vgae") == "vgae"
    with pytest.raises(ValidationFailed, match="unknown planner method"):
        check_method("magic")


def test_lora_strengths_are_capped_at_the_recommended_weight() -> None:
    from planner.coefficients import scale_loras

    assert scale_loras([0.5, 0.5, 0.2], 1.5, [0.6, None, 0.0]) == pytest.approx([0.6, 0.75, 0.3])
    assert scale_loras([2.0, -1.0], 1.0) == [1.0, 0.0]


def test_checkpoint_values_are_shares_or_task_vector_scales() -> None:
    from planner.coefficients import checkpoint_coefficients

    assert checkpoint_coefficients([0.2, 0.6]) == pytest.approx([0.25, 0.75])  # fixed, similarity: sum to 1
    assert checkpoint_coefficients([0.2, 0.6], absolute=True) == pytest.approx([0.2, 0.6])  # vgae: scales
    assert checkpoint_coefficients([-0.1, 1.3], absolute=True) == [0.0, 1.0]
