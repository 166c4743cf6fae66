"""``diffgraph eval``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from core.cli import console, print_json, user_errors


def _split(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def eval_command(
    prompts: Annotated[list[str], typer.Option(
        "--prompts", help="A prompt file (one per line), diffusiondb, partiprompts or world:<name>; repeatable.")],
    methods: Annotated[str, typer.Option(
        "--methods", help="Comma-separated: direct,dare,soup,swarms,fixed,k-lora,similarity,vgae,vgae-solo,"
        "vgae-merged.")] = "direct,dare,soup,swarms,fixed,k-lora,similarity,vgae",
    metrics: Annotated[str, typer.Option("--metrics", help="Comma-separated: ir,hps,as,ps,cs,adherence.")
                       ] = "ir,hps,as,ps,cs",
    seeds: Annotated[int, typer.Option("--seeds", min=1, help="Images per prompt (seeds 0..N-1).")] = 1,
    steps: Annotated[int | None, typer.Option("--steps", min=1, help="Sampling steps (default gen_steps).")] = None,
    size: Annotated[int | None, typer.Option("--size", min=8, help="Image size (default gen_size).")] = None,
    out: Annotated[Path | None, typer.Option("--out", help="Output directory (default <data dir>/eval).")] = None,
    limit: Annotated[int | None, typer.Option("--limit", min=1, help="First N prompts of each set.")] = None,
    swarm_budget: Annotated[int, typer.Option("--swarm-budget", min=1, help="Merges the swarms search may score.")
                            ] = 12,
    json_out: Annotated[bool, typer.Option("--json", help="Print the table as JSON on stdout.")] = False,
) -> None:
    """Compare merge methods on prompt sets: a table of metric means with bootstrap 95 % intervals, an
    HTML page with image grids, and per-image scores (an interrupted run resumes)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from core.settings import get_settings
    from evaluation.report import print_notes, print_table, table, write_html
    from evaluation.run import EvalConfig, run_eval

    settings = get_settings()
    cfg = EvalConfig(
        prompt_sets=prompts, methods=_split(methods), metrics=_split(metrics), seeds=seeds,
        steps=steps or settings.gen_steps, size=size or settings.gen_size, guidance=settings.gen_guidance,
        out_dir=out or settings.data_dir / "eval", limit=limit, swarm_budget=swarm_budget,
    )
    with user_errors(), Progress(TextColumn("{task.description:>12}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), console=console, transient=False) as bars:
        tasks: dict[str, int] = {}

        def progress(method: str, done: int, total: int) -> None:
            if method not in tasks:
                tasks[method] = bars.add_task(method, total=total)
            bars.update(tasks[method], completed=done)

        run = run_eval(settings, cfg, progress)
    page = write_html(run, cfg.out_dir)
    if json_out:
        print_json(table(run))
        print_notes(run, console)
    else:
        print_table(run, console)
    console.print(f"report: {page}", highlight=False)


def register(app: typer.Typer) -> None:
    app.command("eval")(eval_command)
