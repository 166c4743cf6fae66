"""Calibrating tiny-zoo experts end to end: edges, idempotency, failure isolation, CLI, sweep."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from calibration.calibrate import calibrate_experts
from calibration.refset import load_reference_set
from core.records import CalibrationRun, session_scope
from core.types import ExpertKind
from graphdb.store import store_session
from tests.calibration.conftest import local_expert


def _runs(settings) -> list[CalibrationRun]:
    with session_scope(settings) as s:
        return list(s.query(CalibrationRun).order_by(CalibrationRun.id))


def test_calibrate_three_experts_then_rerun_idempotently(calib_settings, tiny_zoo, register,
                                                         corrupt_checkpoint: Path) -> None:
    settings = calib_settings
    experts = [
        local_expert(tiny_zoo.checkpoints[0], "ckpt-a"),
        local_expert(tiny_zoo.checkpoints[1], "ckpt-b"),
        local_expert(tiny_zoo.loras_kohya[1], "lora-a", kind=ExpertKind.lora, recommended_weight=0.8),
    ]
    corrupt = local_expert(corrupt_checkpoint, "corrupt")
    register(settings, [*experts, corrupt])
    ids = [e.id for e in experts]

    outcomes = calibrate_experts(settings, [ids[0], corrupt.id, ids[1], ids[2]])
    by_id = {o.expert_id: o for o in outcomes}
    assert [o.expert_id for o in outcomes] == [ids[0], corrupt.id, ids[1], ids[2]]
    for eid in ids:
        assert by_id[eid].status == "succeeded", by_id[eid].error
        assert by_id[eid].n_images == 3 and by_id[eid].n_prompts == 3
    assert by_id[corrupt.id].status == "failed" and by_id[corrupt.id].error

    refset = load_reference_set()
    prompt_ids = {p.id for p in refset.subset(3)}
    with store_session(settings) as store:
        caps = store.get_capabilities()
        stats = store.stats().to_json()
        marked = {eid: store.get_expert(eid) for eid in [*ids, corrupt.id]}
    assert len(caps) == len(experts) * 3
    assert {c.prompt_id for c in caps} == prompt_ids and {c.expert_id for c in caps} == set(ids)
    for c in caps:
        assert 0.0 <= c.score <= 1.0
        assert set(c.metrics) == {"clip_gain", "aesthetic_gain"}
        assert c.n_images == 1 and c.ref_set_version == refset.version and c.calibrated_at is not None
    # a checkpoint swapped in changes the images, so at least one gain is not zero
    assert any(abs(c.metrics["clip_gain"]) > 0 for c in caps)
    for eid in ids:
        assert marked[eid].ref_set_version == refset.version and marked[eid].calibrated_at is not None
        assert "clip:" in marked[eid].scorer_version and "aesthetic:" in marked[eid].scorer_version
    assert marked[corrupt.id].calibrated_at is None and marked[corrupt.id].ref_set_version == ""

    runs = _runs(settings)
    assert [r.status for r in runs].count("succeeded") == 3
    (failed,) = [r for r in runs if r.status == "failed"]
    assert failed.expert_id == corrupt.id and failed.error and failed.finished_at is not None
    ok = [r for r in runs if r.status == "succeeded"]
    assert all(r.n_images == 3 and r.n_prompts == 3 and r.duration_s is not None for r in ok)
    assert all(r.metrics["top_category"] in refset.categories for r in ok)
    cached = sorted((settings.data_dir / "cache" / "calibration").glob("*.png"))
    assert len(cached) == 3  # base images: one per prompt × seed, shared by the three experts

    # rerun: same edges (no duplicates), same scores, same graph statistics, base images from cache
    again = calibrate_experts(settings, ids)
    assert all(o.status == "succeeded" for o in again)
    with store_session(settings) as store:
        caps2 = store.get_capabilities()
        assert store.stats().to_json() == stats
    assert len(caps2) == len(caps)
    assert {(c.expert_id, c.prompt_id): c.score for c in caps2} == {(c.expert_id, c.prompt_id): c.score for c in caps}
    assert sorted((settings.data_dir / "cache" / "calibration").glob("*.png")) == cached
    assert len(_runs(settings)) == 4 + 3  # one row per attempt


def test_unknown_expert_and_missing_base_family_fail_cleanly(calib_settings, tiny_zoo, register) -> None:
    settings = calib_settings
    sdxl = local_expert(tiny_zoo.checkpoints[0], "wrong-family").model_copy(
        update={"id": "local:sdxl-one", "base_family": "sdxl", "base_model": "SDXL 1.0"})
    register(settings, [sdxl])
    outcomes = calibrate_experts(settings, ["civitai:does-not-exist", sdxl.id], n_prompts=1)
    assert [o.status for o in outcomes] == ["failed", "failed"]
    assert "does-not-exist" in outcomes[0].error
    assert "sdxl" in outcomes[1].error and "base" in outcomes[1].error
    assert {r.status for r in _runs(settings)} == {"failed"}

    blind = settings.model_copy(update={"scorer_paths": {}})
    (no_scorer,) = calibrate_experts(blind, [sdxl.id], n_prompts=1)
    assert no_scorer.status == "failed"
    assert "no scorer available" in no_scorer.error and "clip: no weights configured" in no_scorer.error
    assert len(_runs(settings)) == 3


def test_cli_calibrate_expert_and_pending(calib_settings, tiny_zoo, register) -> None:
    from deploy.cli import app

    settings = calib_settings
    lora = local_expert(tiny_zoo.loras_diffusers[0], "lora-d", kind=ExpertKind.lora)
    register(settings, [lora])
    runner = CliRunner()
    res = runner.invoke(app, ["calibrate", "--expert", lora.id, "--prompts", "2", "--json"])
    assert res.exit_code == 0, res.output
    (row,) = json.loads(res.stdout.strip().splitlines()[-1])
    assert row["expert_id"] == lora.id and row["status"] == "succeeded" and row["n_images"] == 2
    assert 0.0 <= row["mean_score"] <= 1.0

    shown = runner.invoke(app, ["graph", "show", lora.id])
    assert shown.exit_code == 0, shown.output
    flat = "".join(shown.output.split())  # rich wraps and crops long lines at the terminal width
    assert "CAPABILITY→2referenceprompt(s)" in flat and "aesthetic_gain=" in flat

    res = runner.invoke(app, ["calibrate", "--pending"])
    assert res.exit_code == 0 and "nothing to calibrate" in res.output
    res = runner.invoke(app, ["calibrate"])
    assert res.exit_code != 0 and "--expert" in res.output


def test_sweep_calibrates_uncalibrated_in_process_without_broker(calib_settings, tiny_zoo, register) -> None:
    from calibration.tasks import sweep

    settings = calib_settings.model_copy(update={"calib_prompts": 1})
    register(settings, [local_expert(tiny_zoo.checkpoints[1], "ckpt-s")])
    first = sweep(settings)
    assert first["found"] == 1 and first["enqueued"] == 0
    assert [o["status"] for o in first["calibrated"]] == ["succeeded"]
    assert sweep(settings)["found"] == 0


def test_failures_record_a_cause_and_sweeps_give_up_after_bounded_attempts(calib_settings, tiny_zoo, register,
                                                                           corrupt_checkpoint) -> None:
    from calibration.tasks import sweep

    settings = calib_settings.model_copy(update={"calib_prompts": 1, "calib_max_attempts": 2})
    bad = local_expert(corrupt_checkpoint, "corrupt-s")
    sdxl = local_expert(tiny_zoo.checkpoints[0], "wrong-family").model_copy(
        update={"id": "local:sdxl-two", "base_family": "sdxl", "base_model": "SDXL 1.0"})
    register(settings, [bad, sdxl])
    for _attempt in (1, 2):
        swept = sweep(settings)
        assert swept["found"] == 2 and swept["given_up"] == []
        assert {o["expert_id"]: o["cause"] for o in swept["calibrated"]} == {bad.id: "expert", sdxl.id: "setup"}
    third = sweep(settings)  # the corrupt expert failed on its own twice; the missing base is not its fault
    assert third["found"] == 1 and [o["expert_id"] for o in third["calibrated"]] == [sdxl.id]
    (gone,) = third["given_up"]
    assert gone["expert_id"] == bad.id and gone["failures"] == 2 and gone["last_error"]
    assert {r.cause for r in _runs(settings) if r.expert_id == bad.id} == {"expert"}

    from calibration.cli import _pending_ids

    assert _pending_ids(settings, 10) == [sdxl.id]
    (again,) = calibrate_experts(settings, [bad.id])  # --expert still runs it
    assert again.status == "failed" and again.cause == "expert"


def test_base_image_cache_key_covers_dtype_and_device() -> None:
    from calibration.calibrate import CalibrationConfig, _cache_key

    prompt = load_reference_set().subset(1)[0]
    fp32_cpu = CalibrationConfig(prompts=(prompt,), seeds=(0,), steps=2, size=32, guidance=5.0, batch_size=8,
                                 dtype="fp32", device_kind="cpu")
    keys = {_cache_key("base", prompt.text, 0, cfg, [prompt.text]) for cfg in (
        fp32_cpu, CalibrationConfig(**{**fp32_cpu.__dict__, "dtype": "fp16"}),
        CalibrationConfig(**{**fp32_cpu.__dict__, "device_kind": "cuda"}))}
    assert len(keys) == 3


def test_a_scorer_whose_package_fails_to_import_is_reported_unavailable(calib_settings, tiny_zoo, register,
                                                                        tmp_path: Path, monkeypatch) -> None:
    """A scorer whose loader's import raises (an installed but broken package) costs that scorer only, with a
    one-line reason. ImageReward itself runs on transformers' BLIP classes now, so a broken package stands in
    for any scorer dependency."""
    import importlib

    from calibration import scorers as scorer_registry
    from calibration.scorers import Unavailable, available_scorers

    pkg = tmp_path / "site" / "broken_reward_pkg"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise ImportError(\"cannot import name 'BertTokenizer' from 'transformers'\\n"
                                     "more detail on a second line\")\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setitem(scorer_registry.LOADERS, "imagereward",
                        lambda settings: importlib.import_module("broken_reward_pkg"))
    settings = calib_settings.model_copy(update={"calib_prompts": 1})
    scorers = available_scorers(settings)
    reward = scorers["imagereward"]
    assert isinstance(reward, Unavailable) and "ImportError" in reward.reason and "BertTokenizer" in reward.reason
    assert "\n" not in reward.reason and not isinstance(scorers["clip"], Unavailable)
    expert = local_expert(tiny_zoo.checkpoints[1], "ckpt-r")
    register(settings, [expert])
    (outcome,) = calibrate_experts(settings, [expert.id])
    assert outcome.status == "succeeded" and "imagereward" in outcome.metrics["unavailable_scorers"]


def test_a_calibration_killed_by_its_hard_time_limit_is_recorded_as_failed(calib_settings) -> None:
    """Celery calls the task's ``on_failure`` in the worker's main process after a hard kill."""
    from billiard.exceptions import TimeLimitExceeded

    from calibration.calibrate import _start_run
    from calibration.tasks import calibrate_expert

    settings = calib_settings
    running = _start_run(settings, "civitai:1", "task-killed", "v1", "clip:1", 3)
    other = _start_run(settings, "civitai:2", "task-alive", "v1", "clip:1", 3)
    calibrate_expert.on_failure(TimeLimitExceeded(7300), "task-killed", ("civitai:1",), {}, None)
    runs = {r.id: r for r in _runs(settings)}
    assert runs[running].status == "failed" and "time limit exceeded" in runs[running].error
    assert runs[running].cause == "expert" and runs[running].finished_at is not None
    assert runs[other].status == "running"  # another task's run is left alone
