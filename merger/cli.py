"""``diffgraph merge``: the standalone merge tool (checkpoints merged, LoRAs fused, one output)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import typer

from core.cli import console, deprecated, fail, print_json, user_errors
from merger.recipe import MERGE_METHODS, MergeRecipe


@dataclass(frozen=True)
class WeightedPath:
    path: Path
    weight: float


def parse_weighted(value: str, what: str) -> WeightedPath:
    """``FILE:WEIGHT`` → a path and weight (``FILE`` alone means weight 1.0), with a clear error otherwise."""
    file, sep, raw = value.rpartition(":")
    if not sep or not file:
        file, raw = value, "1.0"
    try:
        weight = float(raw)
    except ValueError:
        fail(f"bad {what} {value!r}: expected FILE:WEIGHT, e.g. model.safetensors:0.5")
    if weight != weight or weight in (float("inf"), float("-inf")):
        fail(f"bad {what} {value!r}: the weight must be a finite number")
    return WeightedPath(Path(file).expanduser(), weight)


def _existing(item: WeightedPath, what: str) -> WeightedPath:
    if not item.path.exists():
        fail(f"{what} not found: {item.path}")
    return item


def _from_plan(plan_file: Path) -> tuple[MergeRecipe, list[WeightedPath]]:
    from core.settings import get_settings
    from core.types import MergePlan

    try:
        plan = MergePlan.model_validate_json(plan_file.read_text())
    except OSError as exc:
        fail(f"cannot read plan {plan_file}: {exc.strerror}")
    except ValueError as exc:
        fail(f"invalid plan {plan_file}: {str(exc).splitlines()[0]}")
    base = plan.base_model or get_settings().base_models.get(plan.base_family, "")
    if not base:
        fail(f"the plan names no base model and DIFFGRAPH_BASE_MODELS has none for {plan.base_family!r}")
    try:
        recipe = MergeRecipe.from_plan(plan, base, dtype="fp16")
    except ValueError as exc:
        fail(str(exc))
    loras = []
    for e in plan.loras:
        if not e.path:
            fail(f"LoRA {e.expert_id} in the plan has no local path (resolve it with ensure_local first)")
        loras.append(WeightedPath(Path(e.path), e.coefficient))
    return recipe, loras


def register(app: typer.Typer) -> None:
    @app.command("merge")
    def merge(
        out: Path = typer.Option(..., "--out", help="Output .safetensors (single-file base) or directory "
                                                    "(diffusers base; a .safetensors name gives one file)."),
        base: str = typer.Option("", "--base", help="Base model: single-file .safetensors or diffusers dir."),
        ckpt: list[str] = typer.Option([], "--ckpt", help="Checkpoint expert FILE:WEIGHT (repeatable)."),
        lora: list[str] = typer.Option([], "--lora", help="LoRA FILE:WEIGHT to fuse (repeatable)."),
        merge_method: str = typer.Option("", "--merge-method", help="weighted_average | task_arithmetic | ties | "
                                                                    "dare (default: task_arithmetic)"),
        old_method: str = typer.Option("", "--method", hidden=True, help="Deprecated spelling of --merge-method."),
        density: float | None = typer.Option(None, "--density", help="ties/dare keep-rate (default: 0.5)"),
        seed: int | None = typer.Option(None, "--seed", help="dare's mask seed (default: 0)"),
        dtype: str = typer.Option("fp16", "--dtype", help="fp16 | fp32 | bf16"),
        plan: Path | None = typer.Option(None, "--plan", help="A MergePlan JSON (paths filled in)."),
        as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON on stdout."),
    ) -> None:
        """Merge checkpoints into a base (streaming) and fuse LoRAs; the output keeps the base's layout."""
        method = merge_method or old_method
        ckpts = [parse_weighted(v, "--ckpt") for v in ckpt]
        loras = [parse_weighted(v, "--lora") for v in lora]
        planned = None
        if plan is not None:
            planned, plan_loras = _from_plan(plan)
            base = base or planned.base
            ckpts = ckpts or [WeightedPath(Path(p), w) for p, w in planned.experts]
            loras = loras or plan_loras
        if not base:
            fail("give --base (or --plan)")
        method = method or (planned.merge_method if planned else "task_arithmetic")
        density = density if density is not None else (planned.density if planned else 0.5)
        seed = seed if seed is not None else (planned.seed if planned else 0)
        if method not in MERGE_METHODS:
            flag = "--method" if old_method and not merge_method else "--merge-method"
            fail(f"unknown {flag} {method!r} (choose from {', '.join(MERGE_METHODS)})")
        if old_method:  # after the check, so a bad value still gives one line
            deprecated("--method", "--merge-method")
        if not ckpts and not loras:
            fail("nothing to merge: give --ckpt FILE:WEIGHT and/or --lora FILE:WEIGHT")
        base_path = Path(base).expanduser()
        if not base_path.exists():
            fail(f"base model not found: {base_path}")
        ckpts = [_existing(c, "checkpoint") for c in ckpts]
        loras = [_existing(x, "LoRA") for x in loras]
        if base_path.is_file() and out.suffix != ".safetensors":
            fail(f"--out {out}: a single-file base is written as one .safetensors file")
        recipe = MergeRecipe(str(base_path), tuple((str(c.path), c.weight) for c in ckpts), method, density, seed,
                             dtype)
        with user_errors():
            summary = _run(recipe, loras, out)
        if as_json:
            print_json(summary)
        else:
            _print_summary(summary)


def _run(recipe: MergeRecipe, loras: list[WeightedPath], out: Path) -> dict[str, Any]:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from core.settings import get_settings
    from merger.merge import merge, read_recipe

    allow_pickle = get_settings().allow_pickle
    started = time.perf_counter()
    lora_deltas = []
    if loras:
        from merger.lora import load_lora  # owned by merger-lora; imported only when LoRAs are given

        lora_deltas = [(load_lora(x.path, allow_pickle=allow_pickle), x.weight) for x in loras]
    columns = (TextColumn("[bold]merging"), BarColumn(), MofNCompleteColumn(), TextColumn("tensors"),
               TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task("merge", total=None)
        result = merge(recipe, out, lambda done, total: bar.update(task, completed=done, total=total),
                       allow_pickle=allow_pickle, loras=lora_deltas)
    seconds = time.perf_counter() - started
    method = recipe.merge_method
    files = [result] if result.is_file() else sorted(result.rglob("*.safetensors"))
    written = read_recipe(files[0]) or {}
    return {
        "out": str(result),
        "layout": "single_file" if result.is_file() else "diffusers",
        "family": written.get("family"),
        "base": recipe.base,
        "merge_method": method,
        "method": method,  # the pre-recipe key, kept for existing readers of --json
        "dtype": recipe.dtype,
        "density": recipe.density if method in ("ties", "dare") else None,
        "seed": recipe.seed if method == "dare" else None,
        "checkpoints": [{"path": p, "weight": w} for p, w in recipe.experts],
        "recipe_digest": recipe.digest(),
        "loras": [{"path": str(x.path), "weight": x.weight, "format": d.format}
                  for x, (d, _) in zip(loras, lora_deltas, strict=True)],
        "bytes": sum(f.stat().st_size for f in files),
        "seconds": round(seconds, 3),
    }


def _print_summary(summary: dict[str, Any]) -> None:
    from rich.table import Table

    table = Table(title=f"merged → {summary['out']}", show_header=True, header_style="bold")
    table.add_column("kind")
    table.add_column("path")
    table.add_column("weight", justify="right")
    table.add_row("base", summary["base"], "")
    for c in summary["checkpoints"]:
        table.add_row("checkpoint", c["path"], f"{c['weight']:g}")
    for x in summary["loras"]:
        table.add_row(f"LoRA ({x['format']})", x["path"], f"{x['weight']:g}")
    console.print(table)
    extra = ""
    if summary["density"] is not None:
        extra += f", density {summary['density']:g}"
    if summary["seed"] is not None:
        extra += f", seed {summary['seed']}"
    console.print(
        f"{summary['family']} · {summary['method']}{extra} · {summary['dtype']} · {summary['layout']} · "
        f"{summary['bytes'] / 1e6:.1f} MB in {summary['seconds']:.1f} s",
        highlight=False,
    )
