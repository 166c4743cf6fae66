"""``diffgraph graph stats|show|export`` through the real app and the embedded store."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest
from typer.testing import CliRunner

from core.types import Capability, RefPrompt
from deploy.cli import app
from graphdb.store import NODE_LABELS, REL_TYPES, store_session
from tests.graphdb.conftest import make_expert, unit

runner = CliRunner()


@pytest.fixture
def populated(settings):
    with store_session(settings) as store:
        store.upsert_experts(
            [
                make_expert(
                    "civitai:1",
                    kind="checkpoint",
                    name="Realistic Vision",
                    tags=["photo", "portrait"],
                    creator="sg",
                ),
                make_expert("civitai:2", kind="lora", name="Anime Lines", tags=["anime"]),
                make_expert("civitai:3", kind="loha", name="Watercolour"),
            ]
        )
        store.upsert_ref_prompts(
            [
                RefPrompt(
                    id="ref:castle",
                    category="architecture",
                    text="a castle on a hill at sunset",
                    embedding=unit(50),
                )
            ]
        )
        store.write_capabilities(
            [
                Capability(
                    expert_id="civitai:1",
                    prompt_id="ref:castle",
                    score=0.625,
                    metrics={"clip_gain": 0.042},
                    n_images=4,
                    calibrated_at=datetime(2026, 1, 1, tzinfo=UTC),
                )
            ]
        )
        store.link_similar(k=1)
    return settings


def test_stats_json_has_exactly_the_documented_shape(populated):
    result = runner.invoke(app, ["graph", "stats", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert list(data) == ["nodes", "relationships"]
    assert set(data["nodes"]) == set(NODE_LABELS) and set(data["relationships"]) == set(REL_TYPES)
    assert data["nodes"]["Expert"] == 3 and data["nodes"]["Checkpoint"] == 1 and data["nodes"]["LoRA"] == 2
    assert data["relationships"]["CAPABILITY"] == 1 and data["relationships"]["SIMILAR_TO"] == 3


def test_stats_table(populated):
    result = runner.invoke(app, ["graph", "stats"])
    assert result.exit_code == 0, result.output
    assert "CAPABILITY" in result.stdout and "RefPrompt" in result.stdout


def test_show_prints_the_neighbourhood(populated):
    result = runner.invoke(app, ["graph", "show", "civitai:1"])
    assert result.exit_code == 0, result.output
    text = result.stdout
    for needle in (
        "Realistic Vision",
        "BASED_ON → sd15",
        "portrait",
        "CREATED_BY → sg",
        "a castle on a hill",
        "0.625",
        "clip_gain=+0.042",
        "SIMILAR_TO",
    ):
        assert needle in text, needle
    similar_to = [line for line in text.splitlines() if "civitai:2" in line or "civitai:3" in line]
    assert similar_to  # its nearest neighbour is listed


def test_show_unknown_expert_fails_with_one_line(populated):
    result = runner.invoke(app, ["graph", "show", "civitai:404"])
    assert result.exit_code == 1
    assert "civitai:404" in result.output
    assert "Traceback" not in result.output


def test_bad_graph_url_fails_clearly(settings, monkeypatch):
    from core.settings import get_settings

    monkeypatch.setenv("DIFFGRAPH_GRAPH_URL", "ftp://somewhere")
    get_settings.cache_clear()
    result = runner.invoke(app, ["graph", "stats", "--json"])
    assert result.exit_code == 1
    assert "unsupported graph URL" in result.output and result.stdout == ""


def test_unreachable_neo4j_fails_clearly(settings, monkeypatch):
    from core.settings import get_settings

    monkeypatch.setenv("DIFFGRAPH_GRAPH_URL", "bolt://127.0.0.1:1")
    get_settings.cache_clear()
    result = runner.invoke(app, ["graph", "stats"])
    assert result.exit_code != 0
    assert "Traceback" not in result.output and result.output.strip()


def test_export_html_whole_graph_and_one_expert(populated, tmp_path):
    page = tmp_path / "out" / "graph.html"
    result = runner.invoke(app, ["graph", "export", "--html", str(page)])
    assert result.exit_code == 0, result.output
    html = page.read_text()
    assert "Realistic Vision" in html and "a castle on a hill" in html and "Watercolour" in html
    assert "wrote" in result.output
    one = tmp_path / "one.html"
    result = runner.invoke(app, ["graph", "export", "--html", str(one), "--expert", "civitai:2"])
    assert result.exit_code == 0, result.output
    html = one.read_text()
    assert "Anime Lines" in html and "a castle on a hill" not in html
    capped = tmp_path / "capped.html"
    result = runner.invoke(app, ["graph", "export", "--html", str(capped), "--max-nodes", "2"])
    assert result.exit_code == 0 and "wrote 2 nodes" in result.output


def test_export_unknown_expert_fails(populated, tmp_path):
    result = runner.invoke(
        app, ["graph", "export", "--html", str(tmp_path / "x.html"), "--expert", "civitai:404"]
    )
    assert result.exit_code == 1 and "civitai:404" in result.output
    assert not (tmp_path / "x.html").exists()


def test_show_prints_markup_like_data_verbatim(settings):
    with store_session(settings) as store:
        store.upsert_experts([make_expert("civitai:7", name="[red]Neon[/red] Lines", tags=["[b]x[/b]"])])
    result = runner.invoke(app, ["graph", "show", "civitai:7"])
    assert result.exit_code == 0, result.output
    assert "[red]Neon[/red] Lines" in result.stdout and "[b]x[/b]" in result.stdout
