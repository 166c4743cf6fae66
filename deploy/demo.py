"""``diffgraph demo``: the whole DiffGraph loop on the mini world, on a laptop-class CPU.

The world (``world/``: a trained SD1.5-architecture base, checkpoint and LoRA experts that specialise, and
scorers that read what an image shows) ships with the package. The demo serves the experts' homepages in the
real Civitai API format on a loopback port, crawls them with the real spider (register, download with hash
check), calibrates every expert on the world's calibration prompts with the world's scorers, trains the VGAE
planner, plans, merges and samples for prompts that need experts, and writes ``<out>/report.html`` with, per
prompt, the base model's image beside DiffGraph's, the MergePlan and the adherence of each.

It also writes ``<out>/state/diffgraph.toml`` so that ``DIFFGRAPH_DATA_DIR=<out>/state diffgraph generate …``
works afterwards with no other setting.
"""

from __future__ import annotations

import base64
import html
import io
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import typer

from core.cli import console, fail
from core.settings import Settings, get_settings
from core.types import DiffGraphError, MergePlan

# Prompts that each need one or two of the base's rare concepts (so experts should be chosen).
DEMO_PROMPTS: tuple[str, ...] = (
    "a yellow star on a striped background",
    "a neon pink heart on a plain white background",
    "a blue moon on a checkered background, pixel art style",
    "a green square on a dotted background, outline style",
)

REAL_MODEL_COMMANDS = """\
With real models (see README, "Using real models"):
  export DIFFGRAPH_BASE_MODELS='{"sd15": "/models/stable-diffusion-v1-5"}'
  diffgraph crawl civitai --limit 200 --base-model "SD 1.5"
  diffgraph calibrate --pending
  diffgraph planner train
  diffgraph generate "a watercolor fox in a misty forest" --steps 25 --width 512 --height 512"""


@dataclass
class DemoConfig:
    calib_prompts: int = 12
    calib_steps: int = 8
    epochs: int = 150
    steps: int = 20
    guidance: float = 4.0
    prompts: tuple[str, ...] = DEMO_PROMPTS


@dataclass
class DemoResult:
    report: Path
    experts: list[str]
    capabilities: int
    planner_checkpoint: Path
    generations: list[dict[str, Any]] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)


def _stage(name: str, timings: dict[str, float], say: Callable[[str], None]) -> Callable[[], None]:
    say(f"[bold cyan]▶ {name}[/]")
    start = time.perf_counter()

    def done() -> None:
        timings[name] = round(time.perf_counter() - start, 2)
        say(f"  [green]✓[/] {name} ({timings[name]:.1f} s)")

    return done


def demo_settings(base: Settings, state_dir: Path, **update: Any) -> Settings:
    """Settings for an isolated demo run: embedded graph, SQLite and in-process tasks under ``state_dir``."""
    return base.model_copy(
        update={
            "data_dir": state_dir,
            "graph_url": "",
            "sql_url": "",
            "broker_url": "",
            "result_url": "",
            "llm_base_url": "",
            "llm_model": "",
            **update,
        }
    )


def world_settings(cfg: DemoConfig) -> dict[str, Any]:
    """What the demo configures for the world: its base as the ``sd15`` base, its scorers, its prompts."""
    from world import paths

    shipped = str(paths.shipped_dir())
    return {
        "base_models": {"sd15": str(paths.base_model_path())},
        "scorer_paths": {"world-adherence": shipped, "world-clip": shipped},
        "calib_refset": "world",
        "calib_prompts": cfg.calib_prompts,
        "calib_size": 64,
        "calib_steps": cfg.calib_steps,
        "calib_seeds": 1,
        "gen_steps": cfg.steps,
        "gen_guidance": cfg.guidance,
    }


def _toml(values: dict[str, Any]) -> str:
    """A flat TOML document (strings, numbers, string tables) for ``<data dir>/diffgraph.toml``."""
    lines, tables = [], []
    for key, value in values.items():
        if isinstance(value, dict):
            tables.append(f"\n[{key}]\n" + "".join(f"{json.dumps(k)} = {json.dumps(v)}\n" for k, v in value.items()))
        else:
            lines.append(f"{key} = {json.dumps(value)}\n")
    return "# written by `diffgraph demo`: the mini world's settings for this data dir (lowest precedence)\n" + \
        "".join(lines) + "".join(tables)


def run_demo(base: Settings, out: Path, config: DemoConfig | None = None,
             say: Callable[[str], None] = console.print) -> DemoResult:
    """Run the end-to-end demo into ``out`` (``out/state`` is rebuilt each run)."""
    from calibration.calibrate import calibrate_experts
    from crawler.run import crawl
    from deploy.demo_server import CivitaiServer
    from deploy.generation import run_generation
    from graphdb.backends import store_session
    from planner.train import train_planner
    from world import experts_manifest, paths
    from world.integrity import verify_all

    cfg = config or DemoConfig()
    timings: dict[str, float] = {}
    out = out.resolve()
    state = out / "state"
    shutil.rmtree(state, ignore_errors=True)
    for stale in (*out.glob("plan_*.json"), *out.glob("subgraph_*.html")):
        stale.unlink()
    state.mkdir(parents=True)

    done = _stage("1. the mini world (trained base, experts and scorers shipped with the package)", timings, say)
    verify_all()  # every shipped file against its SHA-256 in world.json
    values = world_settings(cfg)
    (state / "diffgraph.toml").write_text(_toml(values))
    settings = demo_settings(base, state, **values)
    homepages = json.loads((paths.shipped_dir() / "homepages.json").read_text())["items"]
    files = {e["name"]: Path(e["file"]) for e in experts_manifest()}
    done()

    done = _stage("2. crawl expert homepages (real Civitai API format, loopback) and register", timings, say)
    with CivitaiServer([]) as server:
        host = server.api_url.split("/api/v1")[0]
        for page in homepages:
            fname = page["modelVersions"][0]["files"][0]["name"]
            url = server.add_file(next(p for p in files.values() if p.name == fname), fname)
            text = json.dumps(page).replace("{host}", host)
            item = json.loads(text)
            for v in item["modelVersions"]:
                v["downloadUrl"] = url
                for f in v["files"]:
                    f["downloadUrl"] = url
            server.items.append(item)
        settings = settings.model_copy(update={"civitai_api_url": server.api_url})
        summary = crawl(settings, "civitai", limit=100, log_level="ERROR")
        if summary.new == 0:
            raise DiffGraphError(f"the demo crawl registered no experts: {summary.counts()} {summary.error or ''}")
        from crawler.downloads import ensure_local

        with store_session(settings) as store:
            experts = store.find_experts()
        for expert in experts:
            ensure_local(settings, expert)  # download + SHA-256 check while the server is up
    say(f"  registered {summary.new} experts: " + ", ".join(e.name for e in experts))
    done()

    done = _stage(f"3. calibrate {len(experts)} experts on {cfg.calib_prompts} world calibration prompts", timings, say)
    outcomes = calibrate_experts(settings, [e.id for e in experts])
    failed = [o for o in outcomes if getattr(o, "status", "") != "succeeded"]
    if failed:
        raise DiffGraphError(f"calibration failed for {len(failed)} experts: {failed[0]}")
    with store_session(settings) as store:
        store.link_similar(k=3)
        n_caps = store.stats().relationships.get("CAPABILITY", 0)
    say(f"  {n_caps} CAPABILITY edges")
    done()

    done = _stage(f"4. train the VGAE planner ({cfg.epochs} epochs)", timings, say)
    trained = train_planner(settings, epochs=cfg.epochs, seed=0)
    done()

    done = _stage(f"5. plan, merge and generate for {len(cfg.prompts)} prompts (and the base alone)", timings, say)
    from merger.generate import Generator
    from world.scorers import adherence

    generations = []
    base_generator = Generator(settings)
    for n, prompt in enumerate(cfg.prompts, start=1):
        result = run_generation(settings, f"demo-{n}", prompt, {"seed": n, "method": "vgae"})
        plan = MergePlan.model_validate(result["plan"])
        (out / f"plan_{n}.json").write_text(plan.model_dump_json(indent=2))
        base_img = base_generator.generate(MergePlan(prompt=prompt, coefficients="base"), prompt, seed=n,
                                                steps=cfg.steps, guidance=cfg.guidance).images[0]
        base_path = out / f"base_{n}.png"
        base_img.save(base_path)
        from PIL import Image

        with Image.open(result["image_paths"][0]) as img:
            ours = adherence([img.convert("RGB"), base_img], [prompt, prompt])
        result.update(base_image_path=str(base_path), adherence=ours[0], base_adherence=ours[1])
        chosen = ", ".join(f"{e.name} ({e.coefficient:.2f})" for e in plan.experts) or "base only"
        say(f"  [{n}] {prompt} → {chosen}; adherence {ours[0]:.2f} (base {ours[1]:.2f})")
        generations.append(result)
    done()

    done = _stage("6. report", timings, say)
    report = write_report(settings, out, generations, experts_total=len(experts), n_caps=n_caps, timings=timings)
    done()
    return DemoResult(report, [e.id for e in experts], n_caps, Path(trained.checkpoint_path), generations, timings)


def _png_data_uri(path: Path) -> str:
    from PIL import Image

    with Image.open(path) as img:
        buf = io.BytesIO()
        img.resize((max(img.width, 256), max(img.height, 256)), Image.NEAREST).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _subgraph_page(settings: Settings, expert_ids: list[str], path: Path) -> bool:
    """Write the activated subgraph of a plan as an interactive neo4j-viz page; False if nothing to show."""
    if not expert_ids:
        return False
    from graphdb.backends import store_session
    from graphdb.viz import render_html, view_of

    with store_session(settings) as store:
        nodes, rels = view_of(store, expert_ids)
    path.write_text(render_html(nodes, rels, height="520px"), encoding="utf-8")
    return True


def _adh(value: float | None) -> str:
    return f" — adherence {value:.2f}" if value is not None else ""


def write_report(settings: Settings, out: Path, generations: list[dict[str, Any]], *, experts_total: int,
                 n_caps: int, timings: dict[str, float]) -> Path:
    """``out/report.html``: per prompt the image, the MergePlan table and the activated subgraph."""
    esc = html.escape
    sections = []
    for n, result in enumerate(generations, start=1):
        plan = MergePlan.model_validate(result["plan"])
        rows = "".join(
            "<tr><td>{}</td><td>{}</td><td>{:.3f}</td><td>{}</td><td>{}</td></tr>".format(
                esc(e.name or e.expert_id),
                esc(e.kind.value),
                e.coefficient,
                f"{e.mean:.3f} ± {e.std:.3f}" if e.mean is not None and e.std is not None else "–",
                esc(e.reason),
            )
            for e in plan.experts
        ) or '<tr><td colspan="5">base model only</td></tr>'
        images = "".join(
            f'<figure><img alt="DiffGraph image {i}" src="{_png_data_uri(Path(p))}"><figcaption>DiffGraph'
            f'{_adh(result.get("adherence"))}</figcaption></figure>' for i, p in enumerate(result["image_paths"])
        )
        if result.get("base_image_path"):
            images = (f'<figure><img alt="base image" src="{_png_data_uri(Path(result["base_image_path"]))}">'
                      f'<figcaption>base alone{_adh(result.get("base_adherence"))}</figcaption></figure>' + images)
        viz_file = out / f"subgraph_{n}.html"
        viz = (
            f'<iframe src="{viz_file.name}" title="activated subgraph"></iframe>'
            if _subgraph_page(settings, [e.expert_id for e in plan.experts], viz_file)
            else "<p>No experts selected.</p>"
        )
        notes = "".join(f"<li>{esc(x)}</li>" for x in plan.notes)
        sections.append(
            f"""<section><h2>{n}. {esc(plan.prompt or result['prompt'])}</h2>
<div class="row"><div class="imgs">{images}</div><div>
<p>method <code>{esc(plan.coefficients)}</code>, merge <code>{esc(plan.merge_method)}</code>, base
<code>{esc(plan.base_family)}</code> — <a href="plan_{n}.json">plan_{n}.json</a></p>
<table><tr><th>expert</th><th>kind</th><th>coefficient</th><th>Beta mean ± sd</th><th>reason</th></tr>{rows}</table>
<ul>{notes}</ul></div></div>{viz}</section>"""
        )
    stage_rows = "".join(f"<tr><td>{esc(k)}</td><td>{v:.1f} s</td></tr>" for k, v in timings.items())
    page = f"""<!doctype html><html lang="en"><head><meta charset="utf-8"><title>DiffGraph demo report</title>
<style>body{{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}}
table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:4px 8px;text-align:left}}
.row{{display:flex;gap:2em}}.imgs{{display:flex;gap:8px}}figure{{margin:0}}
.imgs img{{width:192px;height:192px;image-rendering:pixelated;margin:2px}}
iframe{{width:100%;height:540px;border:1px solid #ccc}}.warn{{background:#fff3cd;padding:.6em 1em}}</style>
</head><body><h1>DiffGraph demo</h1>
<p class="warn">The models are the <b>mini world</b> shipped with DiffGraph: a small SD1.5-architecture base
trained on 64×64 pictures of shapes, and experts fine-tuned on concepts the base rarely saw. Adherence is the
fraction of the prompt's attributes (shape, colour, background, style) that the world's attribute reader
sees in the image.</p>
<p>{experts_total} experts, {n_caps} CAPABILITY edges.</p><table>{stage_rows}</table>
{''.join(sections)}
<pre>{esc(REAL_MODEL_COMMANDS)}</pre></body></html>"""
    report = out / "report.html"
    report.write_text(page, encoding="utf-8")
    return report


def register(app: typer.Typer) -> None:
    @app.command()
    def demo(
        out: Path = typer.Option(None, "--out", help="Output folder (default <data dir>/demo)."),
        epochs: int = typer.Option(DemoConfig.epochs, "--epochs", min=1, help="Planner training epochs."),
        calib_prompts: int = typer.Option(DemoConfig.calib_prompts, "--calib-prompts", min=1),
    ) -> None:
        """Run the whole loop on the shipped mini world and write an HTML report (no GPU, hub or server)."""
        settings = get_settings()
        target = out or settings.data_dir / "demo"
        start = time.perf_counter()
        try:
            result = run_demo(settings, target, DemoConfig(epochs=epochs, calib_prompts=calib_prompts))
        except DiffGraphError as exc:
            fail(str(exc))
        console.print(f"\n[bold green]demo finished in {time.perf_counter() - start:.0f} s[/]")
        console.print(f"report: {result.report}")
        console.print(f"plans:  {', '.join(str(p) for p in sorted(target.glob('plan_*.json')))}")
        console.print(f"explore the demo graph:\n  DIFFGRAPH_DATA_DIR={target / 'state'} diffgraph graph export "
                      f"--html {target / 'graph.html'}", highlight=False, soft_wrap=True)
        console.print(f"generate with the world:\n  DIFFGRAPH_DATA_DIR={target / 'state'} diffgraph generate "
                      '"a red square on a plain white background" --json', highlight=False, soft_wrap=True)
        console.print(REAL_MODEL_COMMANDS, highlight=False)
