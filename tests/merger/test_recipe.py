"""``MergeRecipe``: the merge as data (JSON round trip, a digest the merge cache can rely on, plan → recipe)."""

from __future__ import annotations

import pytest

from core.types import ExpertKind, MergePlan, PlannedExpert
from merger.recipe import MergeRecipe

A, B, C = "a" * 64, "b" * 64, "c" * 64


def test_json_round_trip_and_equality() -> None:
    recipe = MergeRecipe("/m/base.safetensors", (("/m/x.safetensors", 0.5), ("/m/y", 0.25)), "dare", 0.7, 3,
                         "bf16", "sdxl")
    back = MergeRecipe.from_json(recipe.to_json())
    assert back == recipe and back.digest() == recipe.digest() and hash(back) == hash(recipe)
    assert MergeRecipe("b", [("x", 1)]) == MergeRecipe("b", (("x", 1.0),))  # normalised types
    with pytest.raises(ValueError, match="unknown merge recipe field"):
        MergeRecipe.from_json('{"base": "b", "method": "ties"}')
    with pytest.raises(ValueError, match="invalid merge recipe"):
        MergeRecipe.from_json('{"base": "b", "experts": [["x"]]}')


def test_digest_matches_the_cache_keys_merges_were_stored_under() -> None:
    # values of the pre-recipe merger.merge.merge_key for the same inputs: existing cache entries stay valid
    assert MergeRecipe(A, ((B, 0.5), (C, 0.25)), "ties", 0.3, 7, "fp16").digest() == "3d8021cbd670746a4f1ec502bde6eeb4"
    assert MergeRecipe(A, ((B, 0.5),), "task_arithmetic", 0.5, 0, "fp32").digest() == "ea7e1cdfca5ffd9d15f600a34436776f"


def test_digest_covers_what_changes_the_tensors_only() -> None:
    ta = MergeRecipe(A, ((B, 0.5),), "task_arithmetic")
    assert ta.digest() == MergeRecipe(A, ((B, 0.5),), "task_arithmetic", density=0.9, seed=5).digest()
    assert ta.digest() != MergeRecipe(A, ((B, 0.6),), "task_arithmetic").digest()
    assert ta.digest() != MergeRecipe(A, ((B, 0.5),), "task_arithmetic", dtype="fp32").digest()
    assert ta.digest() != MergeRecipe(A, ((B, 0.5),), "task_arithmetic", family="sd15").digest()
    dare = MergeRecipe(A, ((B, 0.5),), "dare", seed=1)
    assert dare.digest() != MergeRecipe(A, ((B, 0.5),), "dare", seed=2).digest()
    assert dare.digest() != MergeRecipe(A, ((B, 0.5),), "dare", seed=1, density=0.3).digest()
    named = MergeRecipe("/m/base", (("/m/x", 0.5),), "task_arithmetic")
    assert named.with_sources(A, [B]) == ta


def test_plan_becomes_a_recipe_and_old_plan_json_still_reads() -> None:
    plan = MergePlan.model_validate_json(
        '{"prompt": "a fox", "method": "fixed", "merge_method": "ties", "density": 0.3, "seed": 2, '
        '"checkpoints": [{"expert_id": "local:a", "kind": "checkpoint", "coefficient": 0.6, "path": "/m/a"}]}')
    assert plan.coefficients == "fixed" and plan.method == "fixed"  # the old key still reads and still writes
    dumped = plan.model_dump(mode="json")
    assert dumped["coefficients"] == dumped["method"] == "fixed"
    assert MergePlan.model_validate(dumped) == plan
    with pytest.raises(ValueError, match="disagree"):
        MergePlan(method="fixed", coefficients="vgae")
    recipe = MergeRecipe.from_plan(plan, "/m/base", "fp16")
    assert recipe == MergeRecipe("/m/base", (("/m/a", 0.6),), "ties", 0.3, 2, "fp16")
    unresolved = plan.model_copy(update={"checkpoints": [
        PlannedExpert(expert_id="civitai:1", kind=ExpertKind.checkpoint, coefficient=1.0)]})
    with pytest.raises(ValueError, match="civitai:1 in the plan has no local path"):
        MergeRecipe.from_plan(unresolved, "/m/base", "fp16")
