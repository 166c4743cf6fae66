"""CLI: ``diffgraph generate``, ``worker``, ``beat`` and ``jobs list|show``.

``generate`` runs in-process by default; ``--submit`` enqueues ``deploy.generate`` on Celery and ``--wait``
follows the task's PROGRESS state. Heavy imports stay inside the commands so ``diffgraph --help`` is fast.
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from core.cli import console, deprecated, fail, print_json, user_errors
from core.settings import Settings, get_settings

POOLS = ("prefork", "solo", "threads")
POLL_S = 0.25


def _options(negative_prompt: str, seed: int, steps: int | None, guidance: float | None, width: int | None,
             height: int | None, num_images: int, method: str, plan_file: Path | None,
             scheduler: str | None = None, clip_skip: int | None = None) -> dict[str, Any]:
    options: dict[str, Any] = {"negative_prompt": negative_prompt, "seed": seed, "num_images": num_images,
                               "method": method}
    for key, value in (("steps", steps), ("guidance", guidance), ("width", width), ("height", height),
                       ("scheduler", scheduler), ("clip_skip", clip_skip)):
        if value is not None:
            options[key] = value
    if plan_file is not None:
        try:
            options["plan"] = json.loads(plan_file.read_text(encoding="utf-8"))
        except FileNotFoundError:
            fail(f"plan file {plan_file} not found")
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            fail(f"plan file {plan_file} is not valid JSON: {exc}")
    return options


def _print_result(result: dict[str, Any]) -> None:
    table = Table(title=f"generation {result['task_id']}", show_header=False)
    table.add_row("status", str(result["status"]))
    table.add_row("prompt", str(result["prompt"])[:200])
    plan = result.get("plan") or {}
    for kind in ("checkpoints", "loras"):
        for pe in plan.get(kind, []):
            table.add_row(kind[:-1], f"{pe['expert_id']}  x {pe['coefficient']:.3f}")
    for key, value in (result.get("timings") or {}).items():
        table.add_row(f"time {key}", f"{value:.2f} s")
    console.print(table)
    for path in result.get("image_paths", []):
        console.print(path, highlight=False, soft_wrap=True)


def _finish(result: dict[str, Any] | None, error: str | None, task_id: str, json_out: bool) -> None:
    if error is not None:
        if json_out:
            print_json({"task_id": task_id, "status": "FAILURE", "error": error})
        fail(error)
    assert result is not None
    if json_out:
        print_json(result)
    else:
        _print_result(result)


def _progress_bar() -> Any:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("[bold]{task.description:<8}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), console=console, transient=True)


def _run_local(settings: Settings, prompt: str, options: dict[str, Any], json_out: bool) -> None:
    from core.types import DiffGraphError
    from deploy.generation import run_generation

    job_id = uuid.uuid4().hex
    result: dict[str, Any] | None = None
    error: str | None = None
    with _progress_bar() as bar:
        handle = bar.add_task("plan", total=1)

        def progress(stage: str, step: int, total: int) -> None:
            bar.update(handle, description=stage, completed=step, total=max(total, 1))

        try:
            result = run_generation(settings, job_id, prompt, options, progress)
        except DiffGraphError as exc:
            error = str(exc)
    _finish(result, error, job_id, json_out)


def _wait(settings: Settings, task_id: str, timeout: float) -> tuple[dict[str, Any] | None, str | None]:
    """Follow a submitted task until it ends; returns (result, error message)."""
    from celery.result import AsyncResult

    from deploy.celery_app import make_app

    handle_result = AsyncResult(task_id, app=make_app(settings))
    deadline = time.monotonic() + timeout
    with _progress_bar() as bar:
        handle = bar.add_task("queued", total=1)
        while True:
            state = handle_result.state
            if state == "SUCCESS":
                return handle_result.result, None
            if state in {"FAILURE", "REVOKED"}:
                exc = handle_result.result
                message = str(exc) if exc is not None else state.lower()
                return None, message or type(exc).__name__
            info = handle_result.info
            if state == "PROGRESS" and isinstance(info, dict):
                total = max(int(info.get("total") or 1), 1)
                bar.update(handle, description=str(info.get("stage", "")), completed=int(info.get("step") or 0),
                           total=total)
            elif state in {"STARTED", "RETRY", "PENDING"}:
                bar.update(handle, description=state.lower())
            if time.monotonic() > deadline:
                return None, f"task {task_id} still {state} after {timeout:.0f} s"
            time.sleep(POLL_S)


def register(app: typer.Typer) -> None:
    jobs_app = typer.Typer(help="Generation records (SQL).", no_args_is_help=True)
    app.add_typer(jobs_app, name="jobs")

    @app.command()
    def generate(
        prompt: str = typer.Argument(..., help="The text prompt."),
        negative_prompt: str = typer.Option("", "--negative-prompt", help="What to steer away from."),
        seed: int = typer.Option(0, "--seed"),
        steps: int | None = typer.Option(None, "--steps", help="Sampling steps (default DIFFGRAPH_GEN_STEPS, else the family's)."),
        guidance: float | None = typer.Option(None, "--guidance", help="CFG scale (default DIFFGRAPH_GEN_GUIDANCE)."),
        width: int | None = typer.Option(None, "--width", help="Multiple of 8 (default DIFFGRAPH_GEN_SIZE, else the base's native size)."),
        height: int | None = typer.Option(None, "--height", help="Multiple of 8 (default DIFFGRAPH_GEN_SIZE, else the base's native size)."),
        num_images: int = typer.Option(1, "--num-images"),
        coefficients: str = typer.Option("", "--coefficients", help="How the planner picks coefficients: "
                                         "vgae|fixed|similarity|direct (default vgae)."),
        old_method: str = typer.Option("", "--method", hidden=True, help="Deprecated: --coefficients."),
        plan_file: Path | None = typer.Option(None, "--plan", help="An explicit MergePlan JSON file."),
        submit: bool = typer.Option(False, "--submit", help="Send to Celery instead of running in-process."),
        wait: bool = typer.Option(False, "--wait", help="With --submit: follow progress and print the result."),
        timeout: float = typer.Option(3600.0, "--timeout", help="With --wait: give up after this many seconds."),
        json_out: bool = typer.Option(False, "--json", help="Print the final result as JSON on stdout."),
        scheduler: str | None = typer.Option(None, "--scheduler", help="Diffusers scheduler class or A1111 "
                                             "name: 'DPM++ 2M Karras', 'Euler a', 'DDIM', 'UniPC' …"),
        clip_skip: int | None = typer.Option(None, "--clip-skip", help="A1111 convention: 1 = last layer, "
                                             "2 = penultimate."),
    ) -> None:
        """Plan, merge and sample images for PROMPT (in-process, or through Celery with --submit).

        Prompt weights (word:1.2) and prompts longer than 77 tokens go through compel; the chosen LoRAs'
        trigger words are added. Steps, guidance and size default to the base family's."""
        from core.queue import GENERATE, send
        from deploy.generation import validate_request

        settings = get_settings()
        if old_method:
            deprecated("--method", "--coefficients")
        method = coefficients or old_method or "vgae"
        options = _options(negative_prompt, seed, steps, guidance, width, height, num_images, method, plan_file,
                           scheduler, clip_skip)
        with user_errors():
            validate_request(prompt, options)  # fail fast here rather than in a worker
        if not submit:
            if wait:
                fail("--wait only applies with --submit")
            _run_local(settings, prompt, options, json_out)
            return
        if not settings.celery_enabled:
            fail("--submit needs a broker: set DIFFGRAPH_BROKER_URL (and DIFFGRAPH_RESULT_URL to --wait)")
        if wait and not settings.result_url:
            fail("--wait needs a result backend: set DIFFGRAPH_RESULT_URL")
        task_id = uuid.uuid4().hex
        try:
            send(settings, GENERATE, (prompt, options), task_id=task_id)
        except Exception as exc:  # broker down: one clear line
            fail(f"cannot submit to {settings.masked()['broker_url']}: {exc}".splitlines()[0])
        if not wait:
            if json_out:
                print_json({"task_id": task_id, "status": "PENDING"})
            else:
                console.print(f"submitted {task_id}", highlight=False)
            return
        result, error = _wait(settings, task_id, timeout)
        _finish(result, error, task_id, json_out)

    @app.command()
    def worker(
        queues: str = typer.Option("ingest,calibrate,generate", "--queues", "-Q", help="Comma-separated queues."),
        concurrency: int | None = typer.Option(None, "--concurrency", "-c", min=1),
        pool: str | None = typer.Option(None, "--pool", "-P", hidden=True,
                                        help="Deprecated and ignored: workers always run the prefork pool."),
        loglevel: str = typer.Option("INFO", "--loglevel", "-l"),
        hostname: str | None = typer.Option(None, "--hostname", "-n"),
    ) -> None:
        """Start a Celery worker consuming QUEUES (GPU machines: --queues calibrate,generate)."""
        from deploy.celery_app import QUEUES

        settings = get_settings()
        if not settings.celery_enabled:
            fail("no broker configured: set DIFFGRAPH_BROKER_URL")
        names = [q.strip() for q in queues.split(",") if q.strip()]
        unknown = sorted(set(names) - set(QUEUES))
        if not names or unknown:
            fail(f"unknown queue(s) {', '.join(unknown) or '(none given)'}; known: {', '.join(QUEUES)}")
        if pool is not None and pool not in POOLS:
            fail(f"unknown pool {pool!r}; one of {', '.join(POOLS)}")
        if pool is not None and pool != "prefork":
            # solo/threads ignore task time limits; a GPU worker runs one task at a time with -c 1.
            console.print(f"--pool {pool} is deprecated and ignored: workers run the prefork pool, which "
                          "enforces time limits (use --concurrency 1 for one task at a time)",
                          style="yellow", highlight=False)
        from deploy.celery_app import app as celery_app

        argv = ["worker", "-Q", ",".join(names), "-P", "prefork", "-l", loglevel]
        if concurrency:
            argv += ["-c", str(concurrency)]
        if hostname:
            argv += ["-n", hostname]
        celery_app.worker_main(argv)

    @app.command()
    def beat(loglevel: str = typer.Option("INFO", "--loglevel", "-l")) -> None:
        """Start the Celery beat scheduler (ingestion, calibration sweep, planner retraining)."""
        settings = get_settings()
        if not settings.celery_enabled:
            fail("no broker configured: set DIFFGRAPH_BROKER_URL")
        from deploy.celery_app import app as celery_app

        settings.data_dir.mkdir(parents=True, exist_ok=True)
        celery_app.Beat(loglevel=loglevel, schedule=str(settings.data_dir / "celerybeat-schedule")).run()

    @jobs_app.command("list")
    def jobs_list(
        status: str | None = typer.Option(None, "--status", help="PENDING|STARTED|SUCCESS|FAILURE"),
        limit: int = typer.Option(20, "--limit"),
        json_out: bool = typer.Option(False, "--json"),
    ) -> None:
        """Recent generation jobs, newest first."""
        from deploy.generation import list_jobs

        with user_errors():
            jobs = list_jobs(get_settings(), status=status, limit=limit)
        if json_out:
            print_json(jobs)
            return
        table = Table(title=f"{len(jobs)} generation job(s)")
        for col in ("id", "status", "stage", "attempts", "created", "prompt"):
            table.add_column(col)
        for job in jobs:
            table.add_row(job["id"], job["status"], job["stage"] or "", str(job["attempts"]),
                          (job["created_at"] or "")[:19], job["prompt"][:60])
        console.print(table)

    @jobs_app.command("show")
    def jobs_show(job_id: str = typer.Argument(...), json_out: bool = typer.Option(False, "--json")) -> None:
        """One generation job: status, parameters, plan, timings, images, error."""
        from deploy.generation import get_job

        with user_errors():
            job = get_job(get_settings(), job_id)
        if json_out:
            print_json(job)
            return
        table = Table(title=f"job {job_id}", show_header=False)
        for key in ("status", "stage", "prompt", "attempts", "worker", "created_at", "finished_at", "error"):
            table.add_row(key, str(job[key]) if job[key] is not None else "")
        table.add_row("params", json.dumps(job["params"]))
        plan = job.get("plan") or {}
        for kind in ("checkpoints", "loras"):
            for pe in plan.get(kind, []):
                table.add_row(kind[:-1], f"{pe['expert_id']}  x {pe['coefficient']:.3f}")
        for key, value in (job.get("timings") or {}).items():
            table.add_row(f"time {key}", f"{value:.2f} s")
        console.print(table)
        for path in job["image_paths"]:
            console.print(path, highlight=False, soft_wrap=True)
