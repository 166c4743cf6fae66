"""``run_generation`` in-process on the tiny zoo: records, images, graph node, exactly-once behaviour."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from core.records import GenerationJob, session_scope
from core.settings import Settings
from core.types import NotFoundError
from deploy.generation import run_generation
from graphdb.store import store_session
from tests.deploy.conftest import explicit_plan, register, zoo_experts

SMALL = {"steps": 2, "width": 64, "height": 64, "seed": 7}


@pytest.fixture
def gen_settings(settings: Settings, tiny_zoo, tmp_path: Path):
    s = settings.model_copy(update={"base_models": {"sd15": str(tiny_zoo.base_dir)}, "device": "cpu",
                                    "dtype": "fp32"})
    experts = zoo_experts(tiny_zoo, tmp_path / "corrupt")
    register(s, experts)
    return s, experts


def _generations(settings: Settings) -> tuple[int, int]:
    with store_session(settings) as store:
        stats = store.stats()
    return stats.nodes.get("Generation", 0), stats.relationships.get("USED", 0)


def _rows(settings: Settings, job_id: str) -> list[GenerationJob]:
    with session_scope(settings) as s:
        return list(s.query(GenerationJob).filter(GenerationJob.id == job_id))


def test_generation_end_to_end_and_exactly_once(gen_settings) -> None:
    settings, experts = gen_settings
    seen: list[tuple[str, int, int]] = []
    options = {**SMALL, "num_images": 2, "plan": explicit_plan(experts)}
    result = run_generation(settings, "job-1", "a red fox", options, lambda *a: seen.append(a))

    assert result["task_id"] == "job-1" and result["status"] == "SUCCESS" and result["prompt"] == "a red fox"
    assert [pe["expert_id"] for pe in result["plan"]["checkpoints"]] == [experts["ckpt0"].id]
    assert [pe["expert_id"] for pe in result["plan"]["loras"]] == [experts["lora0"].id]
    assert result["image_paths"] == [str((settings.data_dir / "images" / "job-1" / f"{i}.png").resolve())
                                     for i in range(2)]
    for path in result["image_paths"]:
        assert Image.open(path).size == (64, 64)
    assert {"plan", "resolve", "sample", "save", "record", "total"} <= set(result["timings"])
    stages = [s for s, _, _ in seen]
    assert stages.index("plan") < stages.index("sample") < stages.index("save") < stages.index("record")
    assert any(s == "sample" and total == 2 for s, _, total in seen)
    assert _generations(settings) == (1, 2)
    (row,) = _rows(settings, "job-1")
    assert row.status == "SUCCESS" and row.attempts == 1 and row.params["steps"] == 2

    # a redelivery of a finished job returns the stored result and does no work
    mtime = Path(result["image_paths"][0]).stat().st_mtime_ns
    seen.clear()
    again = run_generation(settings, "job-1", "a red fox", options, lambda *a: seen.append(a))
    assert again == result and seen == []
    assert Path(result["image_paths"][0]).stat().st_mtime_ns == mtime
    assert _generations(settings) == (1, 2) and len(_rows(settings, "job-1")) == 1

    # a redelivery of an unfinished job (worker died mid-run) redoes it into the same row, files, node
    with session_scope(settings) as s:
        s.get(GenerationJob, "job-1").status = "STARTED"
    redo = run_generation(settings, "job-1", "a red fox", options)
    assert redo["image_paths"] == result["image_paths"] and redo["status"] == "SUCCESS"
    (row,) = _rows(settings, "job-1")
    assert row.attempts == 2
    assert _generations(settings) == (1, 2)
    assert sorted(p.name for p in (settings.data_dir / "images" / "job-1").iterdir()) == ["0.png", "1.png"]


def test_unknown_expert_in_plan_writes_nothing(gen_settings) -> None:
    settings, experts = gen_settings
    plan = explicit_plan(experts)
    plan["loras"][0]["expert_id"] = "civitai:does-not-exist"
    with pytest.raises(NotFoundError, match="civitai:does-not-exist"):
        run_generation(settings, "job-x", "a red fox", {**SMALL, "plan": plan})
    assert _rows(settings, "job-x") == []
    assert _generations(settings) == (0, 0)


def test_corrupt_expert_fails_cleanly(gen_settings) -> None:
    from core.types import DiffGraphError

    settings, experts = gen_settings
    with pytest.raises(DiffGraphError) as err:
        run_generation(settings, "job-c", "a red fox", {**SMALL, "plan": explicit_plan(experts, lora="corrupt")})
    (row,) = _rows(settings, "job-c")
    assert row.status == "FAILURE" and row.error == str(err.value)
    assert "corrupt" in row.error.lower() or experts["corrupt"].id in row.error or "header" in row.error.lower()
    assert _generations(settings) == (0, 0)
    assert not (settings.data_dir / "images" / "job-c").exists()


def test_planner_path(gen_settings, embedder) -> None:
    settings, experts = gen_settings
    vectors = embedder.encode([e.skill for e in experts.values()])
    with_emb = {k: e.model_copy(update={"embedding": [float(x) for x in v]})
                for (k, e), v in zip(experts.items(), vectors, strict=True) if k != "corrupt"}
    from graphdb.store import store_session as open_graph

    with open_graph(settings) as store:
        store.delete_expert(experts["corrupt"].id)
    register(settings, with_emb)
    result = run_generation(settings, "job-p", "a tiny test expert", {**SMALL, "method": "similarity"})
    assert result["status"] == "SUCCESS" and result["plan"]["method"] == "similarity"
    used = result["plan"]["checkpoints"] + result["plan"]["loras"]
    assert used and {pe["expert_id"] for pe in used} <= {e.id for e in with_emb.values()}
    assert _generations(settings)[0] == 1


def test_cli_generate_runs_in_process(gen_settings, tiny_zoo, monkeypatch) -> None:
    import json

    from typer.testing import CliRunner

    from core.settings import get_settings
    from deploy.cli import app as cli_app

    settings, experts = gen_settings
    monkeypatch.setenv("DIFFGRAPH_BASE_MODELS", json.dumps({"sd15": str(tiny_zoo.base_dir)}))
    monkeypatch.setenv("DIFFGRAPH_DEVICE", "cpu")
    get_settings.cache_clear()
    plan_file = settings.data_dir / "plan.json"
    plan_file.write_text(json.dumps(explicit_plan(experts, lora="lora1")))
    res = CliRunner().invoke(cli_app, ["generate", "a red fox", "--plan", str(plan_file), "--steps", "2",
                                       "--width", "64", "--height", "64", "--json"])
    assert res.exit_code == 0, res.output
    result = json.loads(res.stdout)
    assert result["status"] == "SUCCESS" and Path(result["image_paths"][0]).is_file()
    assert [pe["expert_id"] for pe in result["plan"]["loras"]] == [experts["lora1"].id]
    (row,) = _rows(settings, result["task_id"])
    assert row.status == "SUCCESS"
    shown = CliRunner().invoke(cli_app, ["jobs", "show", result["task_id"], "--json"])
    assert json.loads(shown.stdout)["image_paths"] == result["image_paths"]

    plan_file.write_text(json.dumps(explicit_plan(experts, lora="corrupt")))
    res = CliRunner().invoke(cli_app, ["generate", "a red fox", "--plan", str(plan_file), "--steps", "2",
                                       "--width", "64", "--height", "64", "--json"])
    assert res.exit_code == 1
    failed = json.loads(res.stdout.splitlines()[0])
    assert failed["status"] == "FAILURE" and failed["error"]
    assert _generations(settings) == (1, 2)  # only the successful one: checkpoint + LoRA


def test_explicit_plan_of_another_family_is_refused(gen_settings) -> None:
    from core.types import ValidationFailed

    settings, experts = gen_settings
    plan = explicit_plan(experts)
    plan["base_family"] = "pony"  # the zoo's experts are sd15: a plan never mixes families
    with pytest.raises(ValidationFailed, match="sd15 expert but the plan's base family is pony"):
        run_generation(settings, "job-fam", "a red fox", {**SMALL, "plan": plan})
    assert _rows(settings, "job-fam") == []
