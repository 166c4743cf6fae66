"""Request validation happens before anything is written; jobs CLI reads the SQL records."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from core.records import GenerationJob, session_scope
from core.settings import Settings
from core.types import ValidationFailed
from deploy.cli import app as cli_app
from deploy.generation import GenerateOptions, get_job, list_jobs, run_generation, validate_request

BAD_REQUESTS = [
    ("", {}, "prompt is empty"),
    ("   ", {}, "prompt is empty"),
    ("x" * 100_000, {}, "100,000 characters"),
    ("a fox", {"steps": -3}, "steps"),
    ("a fox", {"steps": 0}, "steps"),
    ("a fox", {"steps": 10_000}, "steps"),
    ("a fox", {"width": 65}, "multiple of 8"),
    ("a fox", {"height": 4096}, "height"),
    ("a fox", {"num_images": 0}, "num_images"),
    ("a fox", {"method": "magic"}, "method"),
    ("a fox", {"sampler": "euler"}, "sampler"),
    ("a fox", {"plan": {"checkpoints": "nope"}}, "plan.checkpoints"),
    ("a fox", "not a dict", "options must be an object"),
]


@pytest.mark.parametrize(("prompt", "options", "needle"), BAD_REQUESTS)
def test_bad_requests_fail_clearly(prompt, options, needle) -> None:
    with pytest.raises(ValidationFailed) as err:
        validate_request(prompt, options)
    assert needle in str(err.value)
    assert "\n" not in str(err.value)


def test_defaults_come_from_settings(settings: Settings) -> None:
    params = validate_request("a fox", {"seed": 3}).resolved(settings)
    assert params == {"negative_prompt": "", "seed": 3, "steps": settings.gen_steps,
                      "guidance": settings.gen_guidance, "width": settings.gen_size,
                      "height": settings.gen_size, "num_images": 1, "method": "vgae"}
    explicit = GenerateOptions(plan={"base_family": "sd15"}).resolved(settings)
    assert explicit["method"] == "explicit"


@pytest.mark.parametrize(("prompt", "options"), [("", {}), ("a fox", {"steps": -1}), ("x" * 100_000, {})])
def test_run_generation_rejects_before_writing(settings: Settings, prompt, options) -> None:
    with pytest.raises(ValidationFailed):
        run_generation(settings, "job-bad", prompt, options)
    with session_scope(settings) as s:
        assert s.get(GenerationJob, "job-bad") is None
    assert not (settings.data_dir / "images" / "job-bad").exists()


def test_explicit_plan_cannot_name_an_arbitrary_base(settings: Settings) -> None:
    with pytest.raises(ValidationFailed, match="not a configured base model"):
        run_generation(settings, "job-base", "a fox", {"plan": {"base_model": "/etc/passwd"}})
    with session_scope(settings) as s:
        assert s.get(GenerationJob, "job-base") is None


def _add_jobs(settings: Settings) -> None:
    with session_scope(settings) as s:
        s.add(GenerationJob(id="j-ok", prompt="a fox", status="SUCCESS", params={"seed": 1},
                            image_paths=["/x/0.png"], timings={"sample": 0.5}, attempts=1))
        s.add(GenerationJob(id="j-bad", prompt="a cat", status="FAILURE", error="expert x: corrupt", attempts=1))


def test_jobs_list_and_show(settings: Settings) -> None:
    _add_jobs(settings)
    assert {j["id"] for j in list_jobs(settings)} == {"j-ok", "j-bad"}
    assert [j["id"] for j in list_jobs(settings, status="failure")] == ["j-bad"]
    runner = CliRunner()
    res = runner.invoke(cli_app, ["jobs", "list", "--status", "SUCCESS", "--json"])
    assert res.exit_code == 0, res.output
    rows = json.loads(res.stdout)
    assert [r["id"] for r in rows] == ["j-ok"] and rows[0]["image_paths"] == ["/x/0.png"]
    res = runner.invoke(cli_app, ["jobs", "show", "j-bad", "--json"])
    assert res.exit_code == 0
    shown = json.loads(res.stdout)
    assert shown["status"] == "FAILURE" and shown["error"] == "expert x: corrupt"
    assert get_job(settings, "j-ok")["timings"] == {"sample": 0.5}
    res = runner.invoke(cli_app, ["jobs", "show", "nope"])
    assert res.exit_code == 1 and "no generation job 'nope'" in res.output
    res = runner.invoke(cli_app, ["jobs", "list", "--status", "DONE"])
    assert res.exit_code == 1 and "unknown status" in res.output
    res = runner.invoke(cli_app, ["jobs", "list"])
    assert res.exit_code == 0 and "j-ok" in res.output


def test_generate_cli_rejects_bad_input_and_missing_broker(settings: Settings) -> None:
    runner = CliRunner()
    res = runner.invoke(cli_app, ["generate", "a fox", "--steps", "-2"])
    assert res.exit_code == 1 and "steps" in res.output
    res = runner.invoke(cli_app, ["generate", ""])
    assert res.exit_code == 1 and "prompt is empty" in res.output
    res = runner.invoke(cli_app, ["generate", "a fox", "--submit"])
    assert res.exit_code == 1 and "DIFFGRAPH_BROKER_URL" in res.output
    res = runner.invoke(cli_app, ["generate", "a fox", "--plan", str(settings.data_dir / "missing.json")])
    assert res.exit_code == 1 and "not found" in res.output


def test_generate_cli_coefficients_flag_and_deprecated_method(settings: Settings) -> None:
    runner = CliRunner()
    res = runner.invoke(cli_app, ["generate", "a fox", "--coefficients", "magic"])
    assert res.exit_code == 1 and "method" in res.output and "deprecated" not in res.output
    res = runner.invoke(cli_app, ["generate", "a fox", "--method", "fixed", "--wait"])
    assert res.exit_code == 1 and "--wait only applies with --submit" in res.output
    assert "--method is now --coefficients" in res.stderr
