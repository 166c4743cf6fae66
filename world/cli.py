"""``diffgraph world build|check``: rebuild the mini world from scratch, or measure the shipped one."""

from __future__ import annotations

from pathlib import Path

import typer

from core.cli import console, fail, print_json, user_errors


def register(app: typer.Typer) -> None:
    world = typer.Typer(help="The trained miniature text-to-image world (base, experts, scorers).",
                        no_args_is_help=True)
    app.add_typer(world, name="world")

    @world.command("build")
    def build(
        out: Path = typer.Option(None, "--out", help="Directory to build into (default: the package's weights folder)."),
        force: bool = typer.Option(False, "--force", help="Build into a non-empty directory."),
        seed: int = typer.Option(0, "--seed", help="Seeds every stage."),
        quick: bool = typer.Option(False, "--quick", help="Tiny step counts (seconds; for smoke tests, useless weights)."),
        jobs: int = typer.Option(0, "--jobs", "-j", help="Stages run side by side, one process and one torch thread "
                                                          "each (default: one per CPU core)."),
    ) -> None:
        """Retrain the whole world from scratch on this machine, one progress bar per stage."""
        import torch

        from world import paths
        from world.build import QUICK, Budget, Builder

        target = Path(out) if out else paths.shipped_dir()
        if target.exists() and not target.is_dir():
            fail(f"--out {target} is not a directory")
        if target.is_dir() and any(p.name != ".work" for p in target.iterdir()):
            if not force:
                fail(f"{target} is not empty: pass --force to build over it")
            import shutil

            shutil.rmtree(target / ".work", ignore_errors=True)  # a forced build starts from scratch
        # (a folder holding only .work is an interrupted build: it resumes after its last finished stage)
        if jobs < 0:
            fail("--jobs must be 0 (one per core) or more")
        import os

        # one thread per process: on two cores, two single-threaded stages side by side beat one two-threaded
        torch.set_num_threads(1)
        with user_errors():
            builder = Builder(target, seed=seed, budget=QUICK if quick else Budget())
            data = builder.run(jobs or os.cpu_count() or 1)
        total = sum(data["timings_s"].values())
        console.print(f"world built in {target} ({total:.0f} s of training; {len(data['files'])} files)")

    @world.command("check")
    def check(json_out: bool = typer.Option(False, "--json", help="Print the measurements as JSON.")) -> None:
        """Measure the shipped world: reader accuracy, base adherence, expert gains, merging."""
        from world import check as check_mod

        with user_errors():
            import sys

            result = check_mod.run(log=(lambda msg: print(msg, file=sys.stderr)) if json_out else console.print)
        if json_out:
            print_json(result)
            return
        from rich.table import Table

        table = Table("measure", "value", "target", "")
        for row in check_mod.table(result):
            table.add_row(*row)
        console.print(table)
