"""The demo flow end to end on the shipped mini world (smaller sizes): spider → graph → calibration →
planner → generation → report, then `generate` from the demo's data dir with no other setting."""

import html
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from core.settings import Settings
from core.types import MergePlan
from deploy.demo import DEMO_PROMPTS, DemoConfig, demo_settings, run_demo
from graphdb.store import store_session
from world import experts_manifest, paths

pytestmark = pytest.mark.skipif(not paths.manifest_path().is_file(), reason="no shipped world")


def test_demo_end_to_end(settings: Settings, tmp_path: Path) -> None:
    out = tmp_path / "demo"
    cfg = DemoConfig(calib_prompts=6, calib_steps=4, epochs=40, steps=8, prompts=DEMO_PROMPTS[:2])
    result = run_demo(settings, out, cfg, say=lambda _msg: None)
    n_experts = len(experts_manifest())

    # experts came through the spider (Civitai ids), every one calibrated on every prompt
    assert len(result.experts) == n_experts
    assert all(eid.startswith("civitai:") for eid in result.experts)
    with store_session(demo_settings(settings, out / "state")) as store:
        stats = store.stats()
        assert stats.nodes["Expert"] == n_experts
        assert stats.relationships["CAPABILITY"] == n_experts * cfg.calib_prompts
        assert stats.nodes["Generation"] == len(cfg.prompts)
    assert result.capabilities == n_experts * cfg.calib_prompts
    assert result.planner_checkpoint.is_file()

    report = (out / "report.html").read_text()
    for n, gen in enumerate(result.generations, start=1):
        plan = MergePlan.model_validate(json.loads((out / f"plan_{n}.json").read_text()))
        assert plan.method == "vgae" and not any("fallback" in note.lower() for note in plan.notes)
        assert plan.experts, "the demo prompts should select experts"
        if plan.checkpoints:
            assert abs(sum(e.coefficient for e in plan.checkpoints) - 1.0) < 1e-6
        assert gen["image_paths"] and all(Path(p).is_file() for p in gen["image_paths"])
        assert Path(gen["base_image_path"]).is_file()
        assert 0.0 <= gen["adherence"] <= 1.0 and 0.0 <= gen["base_adherence"] <= 1.0
        assert html.escape(cfg.prompts[n - 1]) in report
        for expert in plan.experts:
            assert html.escape(expert.name) in report
    assert "base alone" in report and "adherence" in report

    # the demo's data dir is enough for `generate`: its diffgraph.toml names the world's base and settings
    env = {k: v for k, v in os.environ.items() if not k.startswith("DIFFGRAPH_")}
    env.update(DIFFGRAPH_DATA_DIR=str(out / "state"), DIFFGRAPH_CONFIG=str(tmp_path / "none.toml"))
    proc = subprocess.run([sys.executable, "-m", "deploy.cli", "generate", "a red square on a plain white background",
                           "--json"], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(proc.stdout)
    from PIL import Image

    from world.scorers import read

    with Image.open(data["image_paths"][0]) as img:
        assert img.size == (64, 64)  # the base's native resolution
        seen = read([img.convert("RGB")])[0]
    assert seen["shape"] == "square" and seen["colour"] == "red"
