"""``diffgraph crawl civitai|huggingface`` and ``diffgraph download EXPERT_ID``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer


def register(app: typer.Typer) -> None:
    app.command("crawl")(crawl_command)
    app.command("download")(download_command)


def crawl_command(
    source: str = typer.Argument(..., help="civitai or huggingface"),
    limit: int | None = typer.Option(None, "--limit", help="Items of this run at most (default: settings)."),
    base_model: str | None = typer.Option(None, "--base-model", help='Source base model, e.g. "SD 1.5".'),
    kind: str | None = typer.Option(None, "--kind", help="checkpoint, lora or locon."),
    since: str | None = typer.Option(None, "--since", help="Only versions created since this ISO date."),
    version_id: list[str] | None = typer.Option(
        None, "--version-id", help="civitai only: refresh these model versions (repeatable) instead of the listing."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON on stdout."),
) -> None:
    """Crawl a source into the expert graph (incremental: known, unchanged versions are skipped; a run that
    stopped early, at --limit or on a broken page, is continued by the next one)."""
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from core.cli import console, fail, print_json, user_errors
    from core.settings import get_settings
    from crawler.run import CrawlSummary, crawl, validate_options

    with user_errors():
        validate_options(source, limit, since)  # before any service is touched
        settings = get_settings()
        columns = (SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn())
        with Progress(*columns, console=console, transient=True, disable=as_json) as bar:
            task = bar.add_task(f"crawling {source}", total=None)

            def tick(s: CrawlSummary) -> None:
                bar.update(task, description=(f"crawling {source}: {s.new} new, {s.updated} updated, "
                                              f"{s.skipped} skipped, {s.failed} failed"))

            summary = crawl(settings, source, limit=limit, base_model=base_model, kind=kind, since=since,
                            version_ids=version_id or None, progress=tick, log_level="ERROR")
    if as_json:
        print_json(summary.to_dict())
    else:
        _print_summary(source, summary)
    if summary.nothing_fetched:
        fail(f"nothing could be fetched from {source}: {summary.first_failure or 'every page failed'}")


def _print_summary(source: str, summary: Any) -> None:
    from rich.table import Table

    from core.cli import console

    table = Table(title=f"crawl {source}")
    for col in ("new", "updated", "skipped", "failed", "requests", "seconds"):
        table.add_column(col, justify="right")
    table.add_row(*(str(x) for x in (summary.new, summary.updated, summary.skipped, summary.failed,
                                     summary.requests, summary.elapsed_s)))
    console.print(table)
    for title, reasons in (("skipped", summary.skipped_reasons), ("failed", summary.failed_reasons)):
        if reasons:
            console.print(f"{title}: " + ", ".join(f"{k}={v}" for k, v in sorted(reasons.items())))
    if summary.error and not summary.nothing_fetched:  # that one is the error line that follows
        console.print(f"[yellow]warning:[/] {summary.error}")


def download_command(
    expert_id: str = typer.Argument(..., help="Expert id, e.g. civitai:128713"),
    as_json: bool = typer.Option(False, "--json", help="Print {expert_id, path} as JSON on stdout."),
    from_file: Path | None = typer.Option(
        None, "--from-file", help="Admit this local copy instead of downloading (checked against the published SHA-256)."
    ),
) -> None:
    """Download (or reuse) an expert's primary weight file into the verified local store. Only http(s) URLs
    on the configured source hosts are fetched; a local file enters only through --from-file."""
    from core.cli import console, print_json, user_errors
    from core.settings import get_settings
    from crawler.downloads import ensure_local

    with user_errors():
        path = ensure_local(get_settings(), expert_id, progress=not as_json, from_file=from_file)
    result: dict[str, Any] = {"expert_id": expert_id, "path": str(path)}
    if as_json:
        print_json(result)
    else:
        console.print(f"{expert_id} → {path}")
