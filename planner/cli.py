"""``diffgraph plan``, ``diffgraph experts search`` and ``diffgraph planner train``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from core.cli import console, deprecated, fail, print_json, user_errors

experts_app = typer.Typer(help="Explore the experts in the graph.", no_args_is_help=True)
planner_app = typer.Typer(help="Train the planner's VGAE.", no_args_is_help=True)

METHOD_HELP = "vgae | fixed | similarity | direct"


def plan_command(
    prompt: Annotated[str, typer.Argument(help="The text-to-image prompt.")],
    json_out: Annotated[bool, typer.Option("--json", help="Print the MergePlan as JSON on stdout.")] = False,
    coefficients: Annotated[str, typer.Option("--coefficients", help=METHOD_HELP)] = "",
    seed: Annotated[int, typer.Option("--seed", help="Seed recorded in the plan.")] = 0,
    old_method: Annotated[str, typer.Option("--method", hidden=True, help="Deprecated: --coefficients.")] = "",
) -> None:
    """Plan a merge for PROMPT: which checkpoints and LoRAs, with which coefficients."""
    from core.settings import get_settings
    from planner import make_plan

    if old_method:
        deprecated("--method", "--coefficients")
    method = coefficients or old_method or "vgae"
    with user_errors():
        plan = make_plan(get_settings(), prompt, method=method, seed=seed)
    if json_out:
        print_json(plan.model_dump(mode="json"))
        return
    from rich.table import Table

    table = Table(
        title=f"plan ({plan.coefficients}, base {plan.base_family}{': ' + plan.base_model if plan.base_model else ''})"
    )
    for col in ("kind", "expert", "name", "coefficient", "Beta α/β", "std", "reason"):
        table.add_column(col)
    for e in plan.experts:
        ab = f"{e.alpha:.2f}/{e.beta:.2f}" if e.alpha is not None and e.beta is not None else "-"
        std = f"{e.std:.3f}" if e.std is not None else "-"
        table.add_row(e.kind.value, e.expert_id, e.name, f"{e.coefficient:.3f}", ab, std, e.reason)
    console.print(table)
    for note in plan.notes:
        console.print(f"- {note}", highlight=False)
    console.print(
        "timings: " + ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in plan.timings.items()), highlight=False
    )


def _row(c) -> dict[str, object]:  # noqa: ANN001 (graphdb.store.Candidate, imported lazily)
    return {
        "expert_id": c.expert.id,
        "source_id": c.expert.source_model_id or c.expert.source_version_id or c.expert.id,
        "name": c.expert.name,
        "version_name": c.expert.version_name,
        "kind": c.expert.kind.value,
        "base_family": c.expert.base_family,
        "score": round(c.score, 6),
    }


def _rows(groups: list) -> list[dict[str, object]]:
    """One row per model (its best version) with the model's other matching versions under ``versions``."""
    return [{**_row(g[0]), "versions": [_row(c) for c in g[1:]]} for g in groups]


def _read_queries(path: Path) -> list[str]:
    """The non-blank lines of a queries file; a bad line fails as ``file:line: why`` before any search."""
    from core.types import ValidationFailed
    from planner.retrieval import search_text

    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValidationFailed(f"cannot read queries file {path}: {exc}") from exc
    queries = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            search_text(line)
        except ValidationFailed as exc:
            raise ValidationFailed(f"{path}:{n}: {exc}") from None
        queries.append(line.strip())
    if not queries:
        raise ValidationFailed(f"{path}: no queries (every line is blank)")
    return queries


@experts_app.command("search")
def search_command(
    text: Annotated[str | None, typer.Argument(help="What to look for.")] = None,
    kind: Annotated[str | None, typer.Option("--kind", help="checkpoint | lora")] = None,
    family: Annotated[str | None, typer.Option("--family", help="Base family, e.g. sd15.")] = None,
    k: Annotated[int, typer.Option("--k", min=1, max=1000, help="How many results.")] = 10,
    json_out: Annotated[bool, typer.Option("--json", help="Print the ranking as JSON on stdout.")] = False,
    queries_file: Annotated[
        Path | None,
        typer.Option("--queries-file", help="One query per line; prints one JSON array per line."),
    ] = None,
    all_versions: Annotated[
        bool, typer.Option("--all-versions", help="Rank versions separately instead of one result per model.")
    ] = False,
) -> None:
    """The retrieval ranking the planner uses: one result per model (its best version; the model's other
    matching versions under ``versions`` in JSON), expert id, source id, name, score."""
    from core.settings import get_settings
    from planner.retrieval import search_groups

    if (text is None) == (queries_file is None):
        fail("give either a search text or --queries-file")
    with user_errors():
        queries = _read_queries(queries_file) if queries_file is not None else [text or ""]
        rankings = search_groups(
            get_settings(), queries, kind=kind, family=family, k=k, all_versions=all_versions
        )
    if queries_file is not None:
        for ranking in rankings:
            print_json(_rows(ranking))
        return
    rows = _rows(rankings[0])
    if json_out:
        print_json(rows)
        return
    from rich.table import Table

    table = Table(title=f"experts matching {json.dumps(text)}")
    for col in ("#", "expert", "source id", "name", "kind", "family", "score", "other versions"):
        table.add_column(col)
    for i, r in enumerate(rows, 1):
        table.add_row(
            str(i),
            *(str(r[c]) for c in ("expert_id", "source_id", "name", "kind", "base_family")),
            f"{r['score']:.3f}",
            str(len(r["versions"])),  # type: ignore[arg-type]
        )
    console.print(table)


@planner_app.command("train")
def train_command(
    epochs: Annotated[int, typer.Option("--epochs", min=1, help="Training epochs.")] = 200,
    seed: Annotated[int, typer.Option("--seed", help="Random seed.")] = 0,
    json_out: Annotated[bool, typer.Option("--json", help="Print the training result as JSON.")] = False,
    target: Annotated[str, typer.Option(
        "--target", help="solo: solo capability scores; merged: coefficients that scored best when merged.")
    ] = "solo",
    prompts: Annotated[int, typer.Option("--prompts", min=1, help="merged: reference prompts searched.")] = 24,
    budget: Annotated[int, typer.Option("--budget", min=1, help="merged: merges scored per prompt.")] = 8,
    metric: Annotated[str | None, typer.Option(
        "--metric", help="merged: utility (adherence on the mini world, else clip, aesthetic, ...).")] = None,
    seeds: Annotated[int, typer.Option(
        "--seeds", min=1, help="merged: images per scored merge (more seeds, fewer ties between merges).")] = 1,
    jobs: Annotated[int, typer.Option(
        "--jobs", min=1, help="merged: searches run at once, in worker processes (one per core).")] = 1,
) -> None:
    """Train the VGAE on the calibrated graph and register a new versioned checkpoint."""
    from core.settings import get_settings
    from planner.train import train_planner

    if target not in ("solo", "merged"):
        fail(f"unknown --target {target!r}: use solo or merged")
    with user_errors():
        if target == "merged":
            from planner.outcomes import train_merged

            result = train_merged(get_settings(), epochs=epochs, seed=seed, n_prompts=prompts, budget=budget,
                                  metric=metric, seeds=seeds, jobs=jobs,
                                  say=lambda m: console.print(m, highlight=False))
        else:
            result = train_planner(get_settings(), epochs=epochs, seed=seed)
    if json_out:
        print_json(result.to_dict())
        return
    console.print(
        f"planner model {result.version} ({target}): {result.n_experts} experts, {result.n_prompts} prompts, "
        f"{result.n_edges} capability edges, {result.seconds:.1f}s",
        highlight=False,
    )
    console.print(f"saved {result.path}", highlight=False)
    for key, value in sorted(result.metrics.items()):
        console.print(f"  {key}: {value}", highlight=False)


def register(app: typer.Typer) -> None:
    """Add ``plan``, ``experts`` and ``planner`` to the ``diffgraph`` app."""
    app.command("plan")(plan_command)
    app.add_typer(experts_app, name="experts")
    app.add_typer(planner_app, name="planner")
