"""The results table: per (method, prompt set, metric) the mean over prompts and a bootstrap 95 % interval.

A prompt's value is the mean over its seeds; the interval is the 2.5–97.5 percentile range of the mean over
``BOOTSTRAP`` resamples of the prompts (seeded, so a table is reproducible). ``paired_differences`` gives,
for ``vgae`` rows against every other method, the same interval for the per-prompt difference (paired on
prompt and seed), which is what "better with the interval excluding zero" is judged on.
"""

from __future__ import annotations

import html
import itertools
import json
from pathlib import Path
from typing import Any

import numpy as np

from evaluation.run import EvalRun, slug

BOOTSTRAP = 1000
SEED = 0


def _per_prompt(run: EvalRun, method: str, set_name: str, metric: str) -> dict[int, float]:
    vals: dict[int, list[float]] = {}
    for (m, s, i, _seed), r in run.records.items():
        if m == method and s == set_name and metric in r["scores"]:
            vals.setdefault(i, []).append(float(r["scores"][metric]))
    return {i: float(np.mean(v)) for i, v in vals.items()}


def bootstrap_ci(values: list[float] | np.ndarray, n: int = BOOTSTRAP, seed: int = SEED) -> tuple[float, float]:
    x = np.asarray(values, dtype=np.float64)
    if len(x) < 2:
        return (float(x[0]), float(x[0])) if len(x) else (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, len(x), (n, len(x)))].mean(axis=1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return float(lo), float(hi)


def table(run: EvalRun) -> dict[str, Any]:
    """The ``--json`` document: ``{"rows": [{"method", "metrics", "ci95"}], "prompts", "seeds"}`` where
    ``metrics[set][metric]`` is a mean and ``ci95[set][metric]`` its ``[low, high]`` (``None`` = n/a)."""
    rows = []
    for method in run.config.methods:
        metrics: dict[str, dict[str, float | None]] = {}
        ci: dict[str, dict[str, list[float] | None]] = {}
        for ps in run.sets:
            metrics[ps.name], ci[ps.name] = {}, {}
            for metric in run.config.metrics:
                vals = list(_per_prompt(run, method, ps.name, metric).values())
                metrics[ps.name][metric] = round(float(np.mean(vals)), 6) if vals else None
                ci[ps.name][metric] = [round(v, 6) for v in bootstrap_ci(vals)] if vals else None
        rows.append({"method": method, "metrics": metrics, "ci95": ci})
    return {
        "rows": rows,
        "prompts": {ps.name: ps.to_json() for ps in run.sets},
        "seeds": run.config.seeds,
    }


def paired_differences(run: EvalRun) -> list[dict[str, Any]]:
    """``ours − other`` per prompt set and metric, with a paired bootstrap 95 % interval; "ours" is every
    ``vgae`` row run (``vgae``, ``vgae-solo``, ``vgae-merged``), "other" every non-VGAE row."""
    ours_rows = [m for m in run.config.methods if m == "vgae" or m.startswith("vgae-")]
    others = [m for m in run.config.methods if m not in ours_rows]
    out = []
    for ours, method, ps, metric in itertools.product(ours_rows, others, run.sets, run.config.metrics):
        a = _per_prompt(run, ours, ps.name, metric)
        b = _per_prompt(run, method, ps.name, metric)
        common = sorted(set(a) & set(b))
        if not common:
            continue
        d = [a[i] - b[i] for i in common]
        lo, hi = bootstrap_ci(d)
        out.append({"ours": ours, "other": method, "set": ps.name, "metric": metric,
                    "diff": round(float(np.mean(d)), 6), "ci95": [round(lo, 6), round(hi, 6)],
                    "excludes_zero": bool(lo > 0 or hi < 0), "n": len(d)})
    return out


def settings_line(run: EvalRun) -> str:
    """Seeds, steps and size as run (size 0 is each base's native resolution, not zero pixels)."""
    size = f"{run.config.size} px" if run.config.size else "the base's native size"
    return f"{run.config.seeds} seed(s), {run.config.steps} steps, {size}"


def _cell(mean: float | None, ci: list[float] | None) -> str:
    if mean is None or ci is None:
        return "n/a"
    return f"{mean:.3f} ±{(ci[1] - ci[0]) / 2:.3f}"


def print_table(run: EvalRun, console: Any) -> None:
    from rich.table import Table

    doc = table(run)
    t = Table(title=f"diffgraph eval — {settings_line(run)}")
    t.add_column("method")
    cols = [(ps.name, m) for ps in run.sets for m in run.config.metrics]
    for set_name, metric in cols:
        t.add_column(f"{metric} · {set_name}", justify="right")
    for row in doc["rows"]:
        t.add_row(row["method"], *(_cell(row["metrics"][s][m], row["ci95"][s][m]) for s, m in cols))
    console.print(t)
    print_notes(run, console)


def print_notes(run: EvalRun, console: Any) -> None:
    """Prompt counts, unavailable scorers, method notes and vgae's paired differences."""
    for ps in run.sets:
        console.print(f"prompts {ps.name}: {len(ps.prompts)} ({ps.dropped} calibration prompts dropped; "
                      f"{ps.source})", highlight=False)
    for metric, reason in sorted(run.unavailable.items()):
        console.print(f"{metric}: unavailable ({reason})", highlight=False)
    for method, notes in run.notes.items():
        for note in notes:
            console.print(f"{method}: {note}", highlight=False)
    diffs = paired_differences(run)
    if diffs:
        console.print("vgae − other (paired, bootstrap 95 %):", highlight=False)
        for d in diffs:
            mark = " *" if d["excludes_zero"] else ""
            console.print(f"  {d['ours']} − {d['other']}, {d['metric']} · {d['set']}: {d['diff']:+.4f} "
                          f"[{d['ci95'][0]:+.4f}, {d['ci95'][1]:+.4f}]{mark}", highlight=False)


GRID_PROMPTS = 24


def write_html(run: EvalRun, out: Path) -> Path:
    """``index.html``: the table, the paired differences and, per method, a grid of its images."""
    doc = table(run)
    e = html.escape
    cols = [(ps.name, m) for ps in run.sets for m in run.config.metrics]
    head = "".join(f"<th>{e(m)} · {e(s)}</th>" for s, m in cols)
    body = "".join(
        "<tr><td>" + e(r["method"]) + "</td>"
        + "".join(f"<td>{e(_cell(r['metrics'][s][m], r['ci95'][s][m]))}</td>" for s, m in cols) + "</tr>"
        for r in doc["rows"])
    parts = [
        "<!doctype html><meta charset='utf-8'><title>diffgraph eval</title>",
        "<style>body{font-family:sans-serif}td,th{padding:2px 8px;border-bottom:1px solid #ddd}"
        ".grid{display:flex;flex-wrap:wrap;gap:6px}.grid figure{margin:0;width:140px;font-size:11px}"
        ".grid img{width:128px;height:128px;image-rendering:pixelated}</style>",
        f"<h1>diffgraph eval</h1><p>{html.escape(settings_line(run))}</p>",
        f"<table><tr><th>method</th>{head}</tr>{body}</table>",
        "<ul>" + "".join(f"<li>{e(ps.name)}: {len(ps.prompts)} prompts, {ps.dropped} calibration prompts dropped "
                         f"({e(ps.source)})</li>" for ps in run.sets)
        + "".join(f"<li>{e(m)}: unavailable ({e(r)})</li>" for m, r in sorted(run.unavailable.items())) + "</ul>",
    ]
    diffs = paired_differences(run)
    if diffs:
        parts.append("<h2>vgae − other (paired bootstrap 95 %)</h2><table>" + "".join(
            f"<tr><td>{e(d['ours'])} − {e(d['other'])}, {e(d['metric'])} · {e(d['set'])}</td><td>{d['diff']:+.4f}</td>"
            f"<td>[{d['ci95'][0]:+.4f}, {d['ci95'][1]:+.4f}]</td><td>{'excludes 0' if d['excludes_zero'] else ''}"
            "</td></tr>" for d in diffs) + "</table>")
    for method in run.config.methods:
        parts.append(f"<h2 id='{e(slug(method))}'>{e(method)}</h2>")
        for note in run.notes.get(method, []):
            parts.append(f"<p>{e(note)}</p>")
        for ps in run.sets:
            figs = []
            for i in range(min(len(ps.prompts), GRID_PROMPTS)):
                r = run.records.get((method, ps.name, i, 0))
                if r is None:
                    continue
                scores = ", ".join(f"{k} {v:.3f}" for k, v in sorted(r["scores"].items()))
                figs.append(f"<figure><img src='{e(r['image'])}' alt=''><figcaption>{e(r['prompt'][:80])}"
                            f"<br>{e(scores)}</figcaption></figure>")
            parts.append(f"<h3>{e(ps.name)}</h3><div class='grid'>{''.join(figs)}</div>")
    path = out / "index.html"
    path.write_text("\n".join(parts), encoding="utf-8")
    (out / "summary.json").write_text(json.dumps({**doc, "paired_differences": diffs, "notes": run.notes,
                                                   "unavailable": run.unavailable}, indent=1))
    return path
