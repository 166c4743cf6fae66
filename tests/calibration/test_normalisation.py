"""Capability normalisation: raw gains kept, logistic squash per metric scale, mean over metrics."""

from __future__ import annotations

import math

import pytest

from calibration.calibrate import METRIC_SCALES, CalibrationConfig, capabilities_for
from core.types import RefPrompt, utcnow


def test_capabilities_keep_raw_gains_and_squash_to_unit_interval() -> None:
    prompts = (RefPrompt(id="a", category="x", text="a cat"), RefPrompt(id="b", category="y", text="a dog"))
    cfg = CalibrationConfig(prompts=prompts, seeds=(0, 1), steps=2, size=32, guidance=7.0, batch_size=8)
    base = {"clip": {("a", 0): 20.0, ("a", 1): 22.0, ("b", 0): 25.0, ("b", 1): 25.0},
            "aesthetic": {("a", 0): 5.0, ("a", 1): 5.0, ("b", 0): 5.0, ("b", 1): 5.0}}
    expert = {"clip": {("a", 0): 22.5, ("a", 1): 24.5, ("b", 0): 25.0, ("b", 1): 25.0},
              "aesthetic": {("a", 0): 5.3, ("a", 1): 5.3, ("b", 0): 5.0 - 1000.0, ("b", 1): 5.0 - 1000.0}}
    caps = {c.prompt_id: c for c in capabilities_for("e:1", cfg, "v1-test", base, expert, utcnow())}

    a, b = caps["a"], caps["b"]
    assert a.metrics == pytest.approx({"clip_gain": 2.5, "aesthetic_gain": 0.3})
    assert a.n_images == 2 and a.ref_set_version == "v1-test"
    # both gains equal their metric scale: each squashes to 1/(1+e^-1)
    assert METRIC_SCALES["clip"] == 2.5 and METRIC_SCALES["aesthetic"] == 0.3
    assert a.score == pytest.approx(1 / (1 + math.exp(-1)), abs=1e-6)
    # no clip gain (0.5) and a hugely negative aesthetic gain (≈0): the mean is ≈0.25, still in [0, 1]
    assert b.metrics["clip_gain"] == 0.0 and b.metrics["aesthetic_gain"] == pytest.approx(-1000.0)
    assert b.score == pytest.approx(0.25, abs=1e-6) and 0.0 <= b.score <= 1.0
