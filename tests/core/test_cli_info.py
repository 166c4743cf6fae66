import json

from typer.testing import CliRunner

from core.settings import Settings, get_settings
from deploy.cli import app

runner = CliRunner()


def test_help_lists_commands() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    assert "info" in result.output and "db" in result.output


def test_db_upgrade_creates_database(settings: Settings) -> None:
    result = runner.invoke(app, ["db", "upgrade"])
    assert result.exit_code == 0, result.output
    assert (settings.data_dir / "diffgraph.db").exists()


def test_info_json_masks_secrets_and_reports_health(settings: Settings, monkeypatch) -> None:
    monkeypatch.setenv("DIFFGRAPH_NEO4J_PASSWORD", "hunter2")
    get_settings.cache_clear()
    result = runner.invoke(app, ["info", "--json"])
    data = json.loads(result.stdout)
    assert "hunter2" not in result.stdout
    assert data["config"]["neo4j_password"] == "****"
    assert data["health"]["sql"]["ok"] is True
    assert data["health"]["broker"]["ok"] is True  # not configured = in-process, which is healthy


def test_info_fails_on_unreachable_backend(settings: Settings, monkeypatch) -> None:
    monkeypatch.setenv("DIFFGRAPH_SQL_URL", "postgresql://nobody@127.0.0.1:1/none")
    monkeypatch.setenv("DIFFGRAPH_GRAPH_URL", "ftp://nowhere")
    get_settings.cache_clear()
    result = runner.invoke(app, ["info", "--json"])
    assert result.exit_code == 1
    health = json.loads(result.stdout)["health"]
    assert health["sql"]["ok"] is False
    assert health["graph"]["ok"] is False and "unsupported graph URL" in health["graph"]["detail"]
