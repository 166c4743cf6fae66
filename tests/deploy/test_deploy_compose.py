"""The production stack's structure: docker cannot run here, so the compose file is checked statically."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import typer
import yaml
from typer.testing import CliRunner

from core.settings import Settings, get_settings
from deploy.cli import app as cli_app

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "deploy" / "compose.yaml"
THIRD_PARTY = {"neo4j", "redis", "postgres", "flower"}


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def _resolve(group: typer.core.TyperGroup, argv: list[str]) -> typer.core.TyperCommand:
    """Walk ``argv`` through the CLI's click tree and check every option it passes exists."""
    command = group
    args = list(argv)
    while hasattr(command, "get_command") and args and not args[0].startswith("-"):
        name = args.pop(0)
        sub = command.get_command(typer.Context(command), name)
        assert sub is not None, f"`diffgraph {' '.join(argv)}`: no command {name!r}"
        command = sub
    known = {opt for p in command.params for opt in getattr(p, "opts", [])}
    for arg in args:
        if arg.startswith("-"):
            assert arg.split("=", 1)[0] in known, f"`diffgraph {' '.join(argv)}`: unknown option {arg}"
    return command


def test_every_diffgraph_service_runs_an_existing_cli_command(compose) -> None:
    group = typer.main.get_command(cli_app)
    services = compose["services"]
    ours = {name: svc for name, svc in services.items() if name not in THIRD_PARTY}
    assert {"worker-cpu", "worker-gpu", "beat", "migrate"} <= set(ours)
    for name, svc in ours.items():
        assert svc["build"]["dockerfile"] == "deploy/Dockerfile", name
        assert (COMPOSE.parent / svc["build"]["context"] / svc["build"]["dockerfile"]).is_file()
        assert svc["image"] == "diffgraph:latest", name  # one image for every DiffGraph service
        command = svc["command"]
        assert command[0] == "diffgraph", name
        _resolve(group, command[1:])
    queues = {name: ours[name]["command"][ours[name]["command"].index("--queues") + 1]
              for name in ("worker-cpu", "worker-gpu")}
    assert queues == {"worker-cpu": "ingest", "worker-gpu": "calibrate,generate"}


def test_resolver_catches_a_wrong_command(compose) -> None:
    group = typer.main.get_command(cli_app)
    with pytest.raises(AssertionError, match="no command"):
        _resolve(group, ["wrker"])
    with pytest.raises(AssertionError, match="unknown option"):
        _resolve(group, ["worker", "--queue", "ingest"])


def test_backing_services(compose) -> None:
    services = compose["services"]
    neo4j = services["neo4j"]
    assert neo4j["image"].startswith("neo4j:5")
    assert {"7474:7474", "7687:7687"} <= set(neo4j["ports"])
    assert any(v.endswith(":/data") for v in neo4j["volumes"])
    mounts = [v for v in neo4j["volumes"] if v.startswith("./neo4j:")]
    assert mounts, "deploy/neo4j (style.grass, saved_queries.cypher) must be mounted"
    assert ":style" in COMPOSE.read_text()
    redis_cmd = services["redis"]["command"]
    assert redis_cmd[redis_cmd.index("--appendonly") + 1] == "yes"  # queued tasks survive a restart
    assert services["postgres"]["image"].startswith("postgres")
    assert "flower" in " ".join(services["flower"]["command"])
    gpu = services["worker-gpu"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["driver"] == "nvidia" and "gpu" in gpu["capabilities"]
    assert "deploy" not in services["worker-cpu"]
    for name in ("worker-cpu", "worker-gpu", "beat"):
        env = services[name]["environment"]
        assert env["DIFFGRAPH_BROKER_URL"].startswith("redis://redis:")
        assert env["DIFFGRAPH_GRAPH_URL"].startswith("neo4j://neo4j:7687")
        assert env["DIFFGRAPH_SQL_URL"].startswith("postgresql://")
        assert services[name]["env_file"] == "../.env"
    assert services["worker-gpu"]["environment"]["DIFFGRAPH_DEVICE"] == "cuda"


def test_env_example_documents_every_setting() -> None:
    text = (ROOT / ".env.example").read_text()
    documented = set(re.findall(r"^#? ?(DIFFGRAPH_[A-Z0-9_]+)=", text, flags=re.M))
    expected = {f"DIFFGRAPH_{name.upper()}" for name in Settings.model_fields}
    expected |= {"DIFFGRAPH_CONFIG", "DIFFGRAPH_VISIBILITY_TIMEOUT_S"}
    assert expected <= documented, sorted(expected - documented)
    compose_vars = set(re.findall(r"\$\{(DIFFGRAPH_[A-Z0-9_]+)", COMPOSE.read_text()))
    assert compose_vars <= documented


def test_worker_command_validates_queues_and_pool(settings: Settings, monkeypatch) -> None:
    monkeypatch.setenv("DIFFGRAPH_BROKER_URL", "redis://127.0.0.1:6379/13")
    get_settings.cache_clear()
    runner = CliRunner()
    res = runner.invoke(cli_app, ["worker", "--queues", "ingest,gpu"])
    assert res.exit_code == 1 and "unknown queue(s) gpu" in res.output
    res = runner.invoke(cli_app, ["worker", "--pool", "eventlet"])
    assert res.exit_code == 1 and "unknown pool" in res.output
