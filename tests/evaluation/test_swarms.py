"""The Model Swarms search on synthetic utilities (no sampling)."""

from __future__ import annotations

import numpy as np
import pytest

from planner.swarms import SwarmConfig, swarm_search


def test_swarm_finds_the_optimum_within_its_budget() -> None:
    target = np.array([0.8, 0.2, 0.5])
    calls = []

    def utility(x: np.ndarray) -> float:
        calls.append(x)
        return -float(((x - target) ** 2).sum())

    result = swarm_search(3, utility, SwarmConfig(budget=40, particles=6, seed=1))
    assert len(calls) == len(result.evaluations) <= 40
    assert result.best_utility == max(u for _, u in result.evaluations)
    assert np.abs(result.best - target).max() <= 0.2
    # the uniform merge (fixed) is always evaluated first
    assert result.evaluations[0][0] == (1.0, 1.0, 1.0)


def test_swarm_is_deterministic_and_respects_tiny_budgets() -> None:
    f = lambda x: float(x[0] - x[1])  # noqa: E731
    a = swarm_search(2, f, SwarmConfig(budget=5, seed=3))
    b = swarm_search(2, f, SwarmConfig(budget=5, seed=3))
    assert a.evaluations == b.evaluations and len(a.evaluations) <= 5
    with pytest.raises(ValueError):
        swarm_search(0, f)
