"""The demo flow end to end (smaller sizes): spider → graph → calibration → planner → generation → report."""

import html
import json
from pathlib import Path

from core.settings import Settings
from core.types import MergePlan
from deploy.demo import DEMO_EXPERTS, DEMO_PROMPTS, DemoConfig, demo_settings, run_demo
from graphdb.store import store_session


def test_demo_end_to_end(settings: Settings, tmp_path: Path) -> None:
    out = tmp_path / "demo"
    cfg = DemoConfig(calib_prompts=12, epochs=40, steps=2, size=32, prompts=DEMO_PROMPTS[:2])
    result = run_demo(settings, out, cfg, say=lambda _msg: None)

    # experts came through the spider (Civitai ids), every one calibrated on every prompt
    assert len(result.experts) == len(DEMO_EXPERTS)
    assert all(eid.startswith("civitai:") for eid in result.experts)
    with store_session(demo_settings(settings, out / "state")) as store:
        stats = store.stats()
        assert stats.nodes["Expert"] == len(DEMO_EXPERTS)
        assert stats.relationships["CAPABILITY"] == len(DEMO_EXPERTS) * cfg.calib_prompts
        assert stats.nodes["Generation"] == len(cfg.prompts)
    assert result.capabilities == len(DEMO_EXPERTS) * cfg.calib_prompts
    assert result.planner_checkpoint.is_file()

    report = (out / "report.html").read_text()
    for n, gen in enumerate(result.generations, start=1):
        plan = MergePlan.model_validate(json.loads((out / f"plan_{n}.json").read_text()))
        assert plan.method == "vgae" and not any("fallback" in note.lower() for note in plan.notes)
        assert plan.experts, "the demo prompts should select experts"
        if plan.checkpoints:
            assert abs(sum(e.coefficient for e in plan.checkpoints) - 1.0) < 1e-6
        assert all(0.0 <= e.coefficient <= settings.lora_max_weight for e in plan.loras)
        assert gen["image_paths"] and all(Path(p).is_file() for p in gen["image_paths"])
        assert html.escape(cfg.prompts[n - 1]) in report
        for expert in plan.experts:
            assert html.escape(expert.name) in report
        assert (out / f"subgraph_{n}.html").is_file()
    assert "tiny and randomly initialised" in report
