"""``diffgraph eval`` end to end on the tiny zoo: table, JSON shape, resume, rescoring, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from deploy.cli import app

runner = CliRunner()
COMMON = ["--steps", "2", "--size", "32", "--swarm-budget", "3"]


def _eval(*args: str) -> tuple[int, str, str]:
    result = runner.invoke(app, ["eval", *args, *COMMON])
    return result.exit_code, result.stdout, result.stderr


def test_eval_table_json_html_and_resume(eval_settings, prompt_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    methods = "direct,soup,fixed,k-lora,vgae"
    code, stdout, stderr = _eval("--prompts", str(prompt_file), "--methods", methods, "--metrics", "cs,ir",
                                 "--seeds", "2", "--out", str(out), "--json")
    assert code == 0, stderr
    doc = json.loads(stdout)
    assert set(doc) == {"rows", "prompts", "seeds"} and doc["seeds"] == 2
    assert [r["method"] for r in doc["rows"]] == methods.split(",")
    name = str(prompt_file)
    assert doc["prompts"][name]["n"] == 2
    for row in doc["rows"]:
        assert set(row) == {"method", "metrics", "ci95"}
        cs, ci = row["metrics"][name]["cs"], row["ci95"][name]["cs"]
        assert ci[0] <= cs <= ci[1]
        assert row["metrics"][name]["ir"] is None  # no ImageReward weights configured: n/a, not skipped
    assert "ir: unavailable (no weights configured" in stderr
    # vgae had no trained planner: the run says it fell back
    assert "vgae: fallback:" in stderr.replace("\n", " ") or "fallback" in (out / "index.html").read_text()
    lines = (out / "scores.jsonl").read_text().splitlines()
    assert len(lines) == 5 * 2 * 2
    recs = [json.loads(x) for x in lines]
    assert all((out / r["image"]).is_file() and set(r["scores"]) == {"cs"} for r in recs)
    # every method sees the same prompt and seed; direct differs from the merges
    page = (out / "index.html").read_text()
    assert all(f"id='{m}'" in page for m in methods.split(","))
    assert "2 seed(s), 2 steps, 32 px" in page
    # vgae's paired differences against every other row, per metric scored (ir is unavailable: no pairs)
    diffs = json.loads((out / "summary.json").read_text())["paired_differences"]
    assert sorted((d["ours"], d["other"]) for d in diffs) == [("vgae", m) for m in ("direct", "fixed", "k-lora", "soup")]
    cs = {m: {(r["index"], r["seed"]): r["scores"]["cs"] for r in recs if r["method"] == m} for m in ("direct", "vgae")}
    vs_direct = next(d for d in diffs if d["other"] == "direct")
    per_prompt = [sum(cs["vgae"][(i, s)] - cs["direct"][(i, s)] for s in (0, 1)) / 2 for i in (0, 1)]
    assert vs_direct["diff"] == pytest.approx(sum(per_prompt) / 2, abs=1e-4) and vs_direct["n"] == 2
    # the same seed gives the same image for the same weights, whatever the batch
    direct = cs["direct"]

    # a rerun samples nothing and gives the same table
    code, stdout2, _ = _eval("--prompts", str(prompt_file), "--methods", methods, "--metrics", "cs",
                             "--seeds", "2", "--out", str(out), "--json")
    assert code == 0 and len((out / "scores.jsonl").read_text().splitlines()) == len(lines)
    assert json.loads(stdout2)["rows"][0]["metrics"][name]["cs"] == doc["rows"][0]["metrics"][name]["cs"]

    # an interrupted run (last records lost, last line torn) resumes: only the missing images are made
    kept = lines[:-3] + ['{"method": "vgae", "set"']
    (out / "scores.jsonl").write_text("\n".join(kept) + "\n")
    code, _, stderr = _eval("--prompts", str(prompt_file), "--methods", "direct,vgae", "--metrics", "cs",
                            "--seeds", "2", "--out", str(out))
    assert code == 0, stderr
    from evaluation.run import read_records

    records = read_records(out / "scores.jsonl")
    assert len([k for k in records if k[0] == "vgae"]) == 4
    assert {(k[2], k[3]): r["scores"]["cs"] for k, r in records.items() if k[0] == "direct"} == direct


def test_added_metric_rescores_saved_images(eval_settings, prompt_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert _eval("--prompts", str(prompt_file), "--methods", "direct", "--metrics", "cs", "--out", str(out))[0] == 0
    before = (out / "images" / "direct").stat().st_mtime_ns
    code, stdout, stderr = _eval("--prompts", str(prompt_file), "--methods", "direct", "--metrics", "cs,as",
                                 "--out", str(out), "--json")
    assert code == 0, stderr
    row = json.loads(stdout)["rows"][0]["metrics"][str(prompt_file)]
    assert row["as"] is not None and row["cs"] is not None
    assert (out / "images" / "direct").stat().st_mtime_ns == before  # no image was made again


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--methods", "magic"], "unknown method 'magic'"),
        (["--metrics", "fid"], "unknown metric 'fid'"),
        (["--prompts", "world:calibration"], "world:calibration"),
        (["--prompts", "world:dev"], "mini world is not installed"),
        (["--prompts", "nowhere.txt"], "unknown prompt set"),
    ],
)
def test_bad_input_is_one_line_before_work(settings, tmp_path: Path, args: list[str], message: str,
                                           monkeypatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "world", None)  # not installed, whatever the environment has
    base = ["--prompts", "diffusiondb"] if "--prompts" not in args else []
    code, _, stderr = _eval(*base, *args, "--out", str(tmp_path / "o"))
    assert code == 1 and message in stderr and len(stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_bad_prompt_files(settings, tmp_path: Path) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\xe9 au lait".encode("latin-1"))
    for path, message in ((empty, "has no prompts"), (latin, "is not UTF-8")):
        code, _, stderr = _eval("--prompts", str(path), "--out", str(tmp_path / "o"))
        assert code == 1 and message in stderr and len(stderr.strip().splitlines()) == 1


def test_scorer_path_that_does_not_load_is_an_error(settings, tmp_path: Path, monkeypatch) -> None:
    from core.settings import get_settings

    bad = tmp_path / "clip"
    bad.mkdir()
    (bad / "config.json").write_text("{}")
    monkeypatch.setenv("DIFFGRAPH_SCORER_PATHS", json.dumps({"clip": str(bad)}))
    monkeypatch.setenv("DIFFGRAPH_BASE_MODELS", json.dumps({"sd15": str(tmp_path)}))
    get_settings.cache_clear()
    code, _, stderr = _eval("--prompts", "diffusiondb", "--metrics", "cs", "--out", str(tmp_path / "o"))
    assert code == 1 and "cannot load CLIP weights" in stderr and len(stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(("paths", "message"), [
    ({"imagereward": "{tmp}/nowhere/ImageReward.pt"}, "weights not found at"),
    ({"imagereward": "{tmp}/ImageReward.pt"}, "is a pickle; set DIFFGRAPH_ALLOW_PICKLE=1"),
    ({"hpsv2": "{tmp}/HPS_v2_compressed.safetensors"}, "needs a CLIP tokenizer/processor directory"),
])
def test_configured_scorer_that_cannot_load_is_an_error_not_an_empty_column(
        settings, tmp_path: Path, monkeypatch, paths: dict[str, str], message: str) -> None:
    from core.settings import get_settings

    (tmp_path / "ImageReward.pt").write_bytes(b"not read: refused before loading")
    (tmp_path / "HPS_v2_compressed.safetensors").write_bytes(b"not read: no processor")
    monkeypatch.setenv("DIFFGRAPH_SCORER_PATHS", json.dumps({k: v.format(tmp=tmp_path) for k, v in paths.items()}))
    monkeypatch.setenv("DIFFGRAPH_BASE_MODELS", json.dumps({"sd15": str(tmp_path)}))
    get_settings.cache_clear()
    metric = "ir" if "imagereward" in paths else "hps"
    code, _, stderr = _eval("--prompts", "diffusiondb", "--metrics", metric, "--out", str(tmp_path / "o"))
    assert code == 1 and message in stderr and f"metric {metric}" in stderr
    assert len(stderr.strip().splitlines()) == 1 and not (tmp_path / "o").exists()


def test_packaged_sets_drop_calibration_prompts() -> None:
    from calibration.refset import load_reference_set
    from evaluation.prompts import load_prompt_set

    ref = {p.text.lower() for p in load_reference_set().prompts}
    for name in ("diffusiondb", "partiprompts"):
        ps = load_prompt_set(name)
        assert ps.prompts and not ({p.lower() for p in ps.prompts} & ref)
        assert ps.dropped >= 0 and "Apache" in ps.source or "CC0" in ps.source


def test_plans_of_every_method(eval_settings, tmp_path: Path) -> None:
    """dare / soup / swarms merge every checkpoint; ESA methods plan per prompt; k-lora makes one LoRA."""
    from evaluation.methods import METHODS, EvalContext, Swarms
    from evaluation.prompts import PromptSet
    from evaluation.run import _load_checkpoints, _make_plans
    from tests.evaluation.conftest import PROMPTS

    base = eval_settings.base_models["sd15"]
    ctx = EvalContext(eval_settings, "sd15", base, tmp_path, steps=1, size=32, swarm_budget=3)
    names = ["dare", "soup", "fixed", "similarity", "k-lora"]
    methods = {n: METHODS[n]() for n in names}
    _load_checkpoints(ctx, methods)
    assert len(ctx.checkpoints) == 3 and all(Path(e.path).is_file() for e in ctx.checkpoints)
    ps = PromptSet("p", PROMPTS, 0, "test")
    plans = _make_plans(ctx, methods, {n: [(ps, 1)] for n in names})
    soup, dare = plans[("soup", "p", 1)], plans[("dare", "p", 1)]
    assert soup.merge_method == "weighted_average" and [e.coefficient for e in soup.checkpoints] == [0.333333] * 3
    assert dare.merge_method == "dare" and dare.density == 0.5 and len(dare.checkpoints) == 3
    fixed, klora = plans[("fixed", "p", 1)], plans[("k-lora", "p", 1)]
    assert len(fixed.loras) == 2 and all(e.coefficient <= 0.8 for e in fixed.loras)  # capped at recommended
    assert len(klora.loras) == 1 and Path(klora.loras[0].path).is_file()
    assert klora.checkpoints == fixed.checkpoints

    ctx.calibration_prompts = PROMPTS[:1]
    ctx.utility = lambda images, prompts: [float(sum(im.convert("L").getdata())) for im in images]
    swarms = Swarms()
    swarms.prepare(ctx)
    assert swarms.weights is not None and sum(swarms.weights) == pytest.approx(1.0)
    assert json.loads((tmp_path / "swarms.json").read_text())["evaluations"] <= 3


def test_world_sets_and_metrics_go_through_the_world(eval_settings, tmp_path: Path, monkeypatch) -> None:
    import sys

    from PIL import Image

    for name in ("world", "world.prompts", "world.scorers", "world.paths"):  # the fake leaves no trace
        monkeypatch.setitem(sys.modules, name, None)
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.syspath_prepend(str(Path(__file__).parent / "fake_world"))
    out = tmp_path / "run"
    code, stdout, stderr = _eval("--prompts", "world:heldout", "--methods", "direct", "--metrics", "adherence,cs",
                                 "--out", str(out), "--json")
    assert code == 0, stderr
    doc = json.loads(stdout)
    assert doc["prompts"]["world:heldout"]["n"] == 2 and doc["prompts"]["world:heldout"]["dropped_calibration"] == 1
    from world import scorers  # the fake

    recs = [json.loads(x) for x in (out / "scores.jsonl").read_text().splitlines()]
    for r in recs:
        with Image.open(out / r["image"]) as im:
            assert r["scores"]["adherence"] == pytest.approx(scorers.adherence([im], [r["prompt"]])[0], abs=1e-6)
            assert r["scores"]["cs"] == pytest.approx(scorers.clip_score([im], [r["prompt"]])[0], abs=1e-6)
    assert {r["prompt"] for r in recs} == {"a green triangle", "a blue circle above a red square"}


def test_report_header_names_native_size_instead_of_zero_pixels() -> None:
    from types import SimpleNamespace

    from evaluation.report import settings_line

    run = SimpleNamespace(config=SimpleNamespace(seeds=4, steps=20, size=0))
    assert settings_line(run) == "4 seed(s), 20 steps, the base's native size"
