"""``planner train --target merged``: search merged outcomes, train toward them, and ablate in the eval."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from deploy.cli import app

runner = CliRunner()


def test_merged_target_training_and_ablation_rows(eval_settings, prompt_file: Path, tmp_path: Path) -> None:
    from calibration.calibrate import calibrate_experts
    from graphdb.store import store_session
    from planner.train import train_planner
    from planner.vgae_checkpoints import latest_checkpoint, load_checkpoint

    with store_session(eval_settings) as store:
        ids = [e.id for e in store.find_experts()]
    assert all(o.status == "succeeded" for o in calibrate_experts(eval_settings, ids))
    solo = train_planner(eval_settings, epochs=10)

    result = runner.invoke(app, ["planner", "train", "--target", "merged", "--prompts", "4", "--budget", "6",
                                 "--seeds", "2", "--epochs", "10", "--metric", "clip", "--jobs", "2", "--json"])
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["metrics"]["target"] == "merged" and doc["metrics"]["n_outcome_prompts"] >= 1
    assert doc["metrics"]["search_budget"] == 6 and doc["metrics"]["search_seeds"] == 2 and doc["n_edges"] >= 1
    outcomes = [json.loads(p.read_text()) for p in (eval_settings.data_dir / "planner" / "outcomes").glob("*.json")]
    for rec in outcomes:
        assert rec["evaluations"] <= 6 and rec["best_utility"] >= rec["uniform_utility"]
        assert all(0.0 <= t <= 1.0 for t in rec["targets"])
    _same_outcomes_in_process(eval_settings)
    merged = latest_checkpoint(eval_settings, target="merged")
    assert merged is not None and merged.target == "merged"
    assert latest_checkpoint(eval_settings, target="solo").path == solo.path
    # a merged-outcome VGAE's checkpoint Beta means are the task-vector scales themselves; solo's are shared out
    from planner.agent import ExpertSelectionAgent

    prompt = outcomes[0]["prompt"]
    with store_session(eval_settings) as store:
        by_merged = ExpertSelectionAgent(eval_settings, store, checkpoint=merged).plan(prompt, method="vgae")
        by_solo = ExpertSelectionAgent(eval_settings, store, checkpoint=load_checkpoint(solo.path)).plan(
            prompt, method="vgae")
    assert by_merged.checkpoints and by_solo.checkpoints
    assert all(e.coefficient == pytest.approx(e.mean, abs=1e-5) for e in by_merged.checkpoints)
    assert sum(e.coefficient for e in by_solo.checkpoints) == pytest.approx(1.0, abs=1e-5)

    # a second training reuses the searched outcomes (no sampling): same targets, same data fingerprint
    again = runner.invoke(app, ["planner", "train", "--target", "merged", "--prompts", "4", "--budget", "6",
                                "--seeds", "2", "--epochs", "10", "--metric", "clip", "--json"])
    assert json.loads(again.stdout)["metrics"]["data_fingerprint"] == doc["metrics"]["data_fingerprint"]

    out = tmp_path / "run"
    res = runner.invoke(app, ["eval", "--prompts", str(prompt_file), "--methods", "vgae-solo,vgae-merged",
                              "--metrics", "cs", "--steps", "1", "--size", "32", "--limit", "1", "--out", str(out),
                              "--json"])
    assert res.exit_code == 0, res.stderr
    rows = {r["method"]: r for r in json.loads(res.stdout)["rows"]}
    assert set(rows) == {"vgae-solo", "vgae-merged"}
    assert "fallback" not in res.stderr

    # a retrained solo planner makes the vgae-solo images stale: a rerun makes them again, not vgae-merged's
    from evaluation.run import read_records

    newer = train_planner(eval_settings, epochs=5, seed=1)
    res = runner.invoke(app, ["eval", "--prompts", str(prompt_file), "--methods", "vgae-solo,vgae-merged",
                              "--metrics", "cs", "--steps", "1", "--size", "32", "--limit", "1", "--out", str(out)])
    assert res.exit_code == 0, res.stderr
    planners = {k[0]: r["planner"] for k, r in read_records(out / "scores.jsonl").items()}
    latest_merged = latest_checkpoint(eval_settings, target="merged")
    assert planners == {"vgae-solo": newer.version, "vgae-merged": latest_merged.version}


def _same_outcomes_in_process(settings) -> None:
    """Worker processes change where the searches run, not what they find: searched again in this process
    (one torch thread, as in a worker), every record comes back with the same trials (a budget of 6 goes past
    the swarm's fixed starting points, so the search's own seed matters too)."""
    import torch

    from planner.outcomes import search_outcomes

    folder = settings.data_dir / "planner" / "outcomes"
    saved = {p.name: json.loads(p.read_text()) for p in folder.glob("*.json")}
    for p in folder.glob("*.json"):
        p.unlink()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        search_outcomes(settings, 4, 6, "clip", settings.calib_steps, settings.calib_size, seeds=2)
    finally:
        torch.set_num_threads(threads)
    again = {p.name: json.loads(p.read_text()) for p in folder.glob("*.json")}
    assert set(again) == set(saved) and saved
    for name, rec in saved.items():
        assert [v for v, _ in again[name]["trials"]] == [v for v, _ in rec["trials"]]
        assert [u for _, u in again[name]["trials"]] == pytest.approx([u for _, u in rec["trials"]], abs=1e-4)
