"""``diffgraph calibrate``: measure experts on the reference prompts in this process and show the results."""

from __future__ import annotations

from typing import Any

import typer

from core.cli import console, fail, print_json, user_errors
from core.settings import get_settings


def _pending_ids(settings: Any, limit: int) -> list[str]:
    """Uncalibrated experts, less those given up after repeated failures (named on stderr)."""
    from calibration.calibrate import pending_experts

    ids, skipped = pending_experts(settings, limit)
    for eid, info in sorted(skipped.items()):
        last = (info["last_error"] or "").splitlines()[0][:160] if info["last_error"] else "-"
        console.print(f"given up: {eid} failed {info['failures']} times (last: {last}); "
                      f"run `diffgraph calibrate --expert {eid}` to try again", highlight=False, soft_wrap=True)
    return ids


def _table(outcomes: list[Any]) -> Any:
    from rich.table import Table

    table = Table(title="calibration")
    for col in ("expert", "status", "n_images", "mean score", "top category"):
        table.add_column(col, justify="right" if col in {"n_images", "mean score"} else "left")
    for o in outcomes:
        status = "[green]succeeded[/]" if o.status == "succeeded" else f"[red]failed[/]: {o.error or ''}"[:160]
        score = f"{o.mean_score:.3f}" if o.mean_score is not None else "-"
        table.add_row(o.expert_id, status, str(o.n_images), score, o.top_category or "-")
    return table


def register(app: typer.Typer) -> None:
    @app.command()
    def calibrate(
        expert: list[str] = typer.Option(None, "--expert", help="Expert id to calibrate (repeatable)."),
        pending: bool = typer.Option(False, "--pending", help="Calibrate every expert not calibrated for "
                                     "the current reference set."),
        prompts: int | None = typer.Option(None, "--prompts", min=1, help="Reference prompts to use "
                                           "(default: calib_prompts, 0 = all)."),
        seeds: int | None = typer.Option(None, "--seeds", min=1, help="Seeds per prompt (default: calib_seeds)."),
        limit: int = typer.Option(1000, "--limit", min=1, help="With --pending: at most this many experts."),
        json_out: bool = typer.Option(False, "--json", help="Print the outcomes as JSON."),
    ) -> None:
        """Generate with and without each expert on the reference prompts, score, and write CAPABILITY edges."""
        if bool(expert) == pending:
            fail("give either --expert ID (repeatable) or --pending")
        settings = get_settings()
        with user_errors():
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            from calibration.calibrate import calibrate_experts

            ids = list(expert) if expert else _pending_ids(settings, limit)
            if not ids:
                if json_out:
                    print_json([])
                else:
                    console.print("nothing to calibrate: every expert is calibrated for the current reference set")
                return
            with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                          TimeElapsedColumn(), console=console, transient=True) as bar:
                tasks: dict[str, Any] = {}

                def progress(label: str, done: int, total: int) -> None:
                    if label not in tasks:
                        tasks[label] = bar.add_task(label, total=total)
                    bar.update(tasks[label], completed=done, total=total)

                outcomes = calibrate_experts(settings, ids, n_prompts=prompts, n_seeds=seeds, progress=progress)
        if json_out:
            print_json([o.to_json() for o in outcomes])
        else:
            console.print(_table(outcomes))
        if any(o.status != "succeeded" for o in outcomes):
            raise typer.Exit(1)
