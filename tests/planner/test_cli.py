"""``diffgraph plan``, ``diffgraph experts search`` and ``diffgraph planner train`` through the real app."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from core.types import MergePlan
from deploy.cli import app
from tests.planner.graphs import build_planted_graph, build_themed_graph

runner = CliRunner()


@pytest.fixture
def themed(settings, embedder):
    return build_themed_graph(settings, embedder)


def test_plan_json_is_a_merge_plan_on_stdout(settings, themed) -> None:
    result = runner.invoke(
        app, ["plan", "a cute cat in a neon cyberpunk city", "--json", "--method", "fixed", "--seed", "4"]
    )
    assert result.exit_code == 0, result.output
    (line,) = result.stdout.strip().splitlines()
    plan = MergePlan.model_validate_json(line)
    assert plan.method == "fixed" and plan.seed == 4 and plan.loras


def test_plan_table_and_errors(settings, themed) -> None:
    result = runner.invoke(app, ["plan", "a cute cat in a neon cyberpunk city"])
    assert result.exit_code == 0, result.output
    assert "civitai:203" in result.output and "similarity rule" in result.output
    empty = runner.invoke(app, ["plan", "   ", "--json"])
    assert empty.exit_code == 1 and "error: prompt is empty" in empty.output and empty.stdout == ""
    bad = runner.invoke(app, ["plan", "a cat", "--method", "nope"])
    assert bad.exit_code == 1 and "unknown planner method" in bad.output


def test_plan_on_an_empty_graph_is_one_line_error(settings) -> None:
    result = runner.invoke(app, ["plan", "a cat"])
    assert result.exit_code == 1 and "the expert graph is empty" in result.output


def test_experts_search_json_and_queries_file(settings, themed, tmp_path) -> None:
    result = runner.invoke(
        app, ["experts", "search", "cute kittens", "--kind", "lora", "--family", "sd15", "--k", "3", "--json"]
    )
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert len(rows) == 3 and rows[0]["expert_id"] == "civitai:203"
    assert set(rows[0]) >= {"expert_id", "source_id", "name", "score"} and rows[0]["source_id"] == "203"
    assert [r["score"] for r in rows] == sorted((r["score"] for r in rows), reverse=True)

    queries = tmp_path / "queries.txt"
    queries.write_text("cute kittens\nneon cyberpunk city\n\nphotorealistic portrait\n", encoding="utf-8")
    batch = runner.invoke(app, ["experts", "search", "--queries-file", str(queries), "--k", "2"])
    assert batch.exit_code == 0, batch.output
    lines = batch.stdout.strip().splitlines()
    assert len(lines) == 3  # blank lines skipped
    parsed = [json.loads(ln) for ln in lines]
    assert all(isinstance(p, list) and len(p) == 2 for p in parsed)
    assert parsed[0][0]["expert_id"] == "civitai:203"
    assert parsed[1][0]["expert_id"] in {"civitai:201", "civitai:207"}
    assert parsed[2][0]["expert_id"] in {"civitai:101", "civitai:104"}


def test_planner_train_command(settings, embedder) -> None:
    missing = runner.invoke(app, ["planner", "train", "--epochs", "5"])
    assert missing.exit_code == 1 and "no calibrated experts" in missing.output
    build_planted_graph(settings, embedder)
    result = runner.invoke(app, ["planner", "train", "--epochs", "5", "--seed", "2", "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["epochs"] == 5 and out["seed"] == 2 and out["path"].endswith(f"vgae-{out['version']}.pt")


def test_plan_coefficients_flag_and_deprecated_method(settings, themed) -> None:
    new = runner.invoke(app, ["plan", "a cute cat in a neon cyberpunk city", "--json", "--coefficients", "fixed"])
    assert new.exit_code == 0, new.output
    assert "deprecated" not in new.stderr
    data = json.loads(new.stdout)
    assert data["coefficients"] == data["method"] == "fixed"  # the old JSON key is still written
    old = runner.invoke(app, ["plan", "a cute cat in a neon cyberpunk city", "--json", "--method", "fixed"])
    assert old.exit_code == 0, old.output
    assert "--method is now --coefficients" in old.stderr
    assert MergePlan.model_validate_json(old.stdout).coefficients == "fixed"
