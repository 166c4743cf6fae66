"""``diffgraph demo``: the whole DiffGraph loop on the embedded default, on a laptop-class CPU.

It builds a tiny, random SD1.5-architecture zoo, serves it as expert homepages in the real Civitai API
format on a loopback port, crawls them with the real spider (register, download with hash check),
calibrates every expert, trains the VGAE planner, plans and generates for sample prompts, and writes
``<out>/report.html`` with each prompt's image, MergePlan and activated subgraph.
"""

from __future__ import annotations

import base64
import html
import io
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

# The zoo's files dressed as community experts: what a homepage would say about each.
DEMO_EXPERTS: tuple[dict[str, Any], ...] = (
    {
        "zoo": ("checkpoints", 0),
        "type": "Checkpoint",
        "name": "Anime Illustration Mix",
        "tags": ["anime", "illustration", "cel shading", "character"],
        "trained_words": [],
        "description": "<p>A checkpoint tuned for <b>anime</b> characters and colourful illustration, "
        "clean line art and cel shading.</p>",
    },
    {
        "zoo": ("checkpoints", 1),
        "type": "Checkpoint",
        "name": "Photoreal Portrait",
        "tags": ["photorealistic", "portrait", "photography", "realistic skin"],
        "trained_words": [],
        "description": "<p>Photorealistic people: studio portraits, natural skin texture, "
        "cinematic lighting and shallow depth of field.</p>",
    },
    {
        "zoo": ("checkpoints", 2),
        "type": "Checkpoint",
        "name": "Painterly Fantasy Landscapes",
        "tags": ["landscape", "fantasy", "painterly", "scenery"],
        "trained_words": [],
        "description": "<p>Epic fantasy scenery: castles, misty mountains and forests in a painterly "
        "concept-art style.</p>",
    },
    {
        "zoo": ("loras_kohya", 0),
        "type": "LORA",
        "name": "Soft Watercolor Style",
        "tags": ["watercolor", "style", "painting", "soft colors"],
        "trained_words": ["wtrclr style"],
        "description": "<p>Turns any subject into a soft <i>watercolor</i> painting with paper texture "
        "and gentle colour bleeding.</p>",
    },
    {
        "zoo": ("loras_kohya", 1),
        "type": "LORA",
        "name": "Neon Cyberpunk Lights",
        "tags": ["cyberpunk", "neon", "sci-fi", "city", "night"],
        "trained_words": ["neonpunk"],
        "description": "<p>Neon-lit cyberpunk cities at night, glowing signs, rain reflections and "
        "futuristic sci-fi mood.</p>",
    },
)

DEMO_PROMPTS: tuple[str, ...] = (
    "an anime girl with blue hair in a field of flowers, soft watercolor painting",
    "photorealistic portrait of a mercenary in a cyberpunk city at night, neon lights",
    "a misty fantasy landscape with a castle on a mountain, painterly concept art",
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
    calib_prompts: int = 24
    calib_size: int = 32
    calib_steps: int = 2
    epochs: int = 150
    steps: int = 4
    size: int = 64
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


def run_demo(base: Settings, out: Path, config: DemoConfig | None = None,
             say: Callable[[str], None] = console.print) -> DemoResult:
    """Run the end-to-end demo into ``out`` (``out/models`` is reused between runs, ``out/state`` is not)."""
    from calibration.calibrate import calibrate_experts
    from calibration.testing import build_tiny_clip
    from crawler.run import crawl
    from crawler.testing import CivitaiFixtureServer, civitai_item_for
    from deploy.generation import run_generation
    from graphdb.backends import store_session
    from merger.testing import build_tiny_zoo
    from planner.train import train_planner

    cfg = config or DemoConfig()
    timings: dict[str, float] = {}
    out = out.resolve()
    state = out / "state"
    shutil.rmtree(state, ignore_errors=True)
    for stale in (*out.glob("plan_*.json"), *out.glob("subgraph_*.html")):
        stale.unlink()
    state.mkdir(parents=True)

    done = _stage("1. tiny SD1.5-architecture zoo and tiny CLIP scorer", timings, say)
    zoo = build_tiny_zoo(out / "models" / "zoo")
    scorer_paths = build_tiny_clip(out / "models" / "scorers")
    settings = demo_settings(
        base,
        state,
        base_models={"sd15": str(zoo.base_dir)},
        scorer_paths=scorer_paths,
        calib_prompts=cfg.calib_prompts,
        calib_size=cfg.calib_size,
        calib_steps=cfg.calib_steps,
        calib_seeds=1,
        gen_steps=cfg.steps,
        gen_size=cfg.size,
    )
    done()

    done = _stage("2. crawl expert homepages (real Civitai API format, loopback) and register", timings, say)
    with CivitaiFixtureServer([]) as server:
        for i, spec in enumerate(DEMO_EXPERTS):
            group, idx = spec["zoo"]
            path: Path = getattr(zoo, group)[idx]
            server.items.append(
                civitai_item_for(
                    path,
                    name=spec["name"],
                    type=spec["type"],
                    tags=spec["tags"],
                    trained_words=spec["trained_words"],
                    description=spec["description"],
                    download_url=server.add_file(path, f"{i}_{path.name}"),
                    file_name=f"{i}_{path.name}",
                    downloads=1000 * (i + 1),
                )
            )
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

    done = _stage(f"3. calibrate {len(experts)} experts on {cfg.calib_prompts} reference prompts", timings, say)
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

    done = _stage(f"5. plan, merge and generate for {len(cfg.prompts)} prompts", timings, say)
    generations = []
    for n, prompt in enumerate(cfg.prompts, start=1):
        result = run_generation(
            settings,
            f"demo-{n}",
            prompt,
            {"seed": n, "steps": cfg.steps, "width": cfg.size, "height": cfg.size, "method": "vgae"},
        )
        plan = MergePlan.model_validate(result["plan"])
        (out / f"plan_{n}.json").write_text(plan.model_dump_json(indent=2))
        chosen = ", ".join(f"{e.name} ({e.coefficient:.2f})" for e in plan.experts) or "base only"
        say(f"  [{n}] {prompt[:60]}… → {chosen}")
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
            f'<img alt="generated image {i}" src="{_png_data_uri(Path(p))}">' for i, p in enumerate(result["image_paths"])
        )
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
<p>method <code>{esc(plan.method)}</code>, merge <code>{esc(plan.merge_method)}</code>, base
<code>{esc(plan.base_family)}</code> — <a href="plan_{n}.json">plan_{n}.json</a></p>
<table><tr><th>expert</th><th>kind</th><th>coefficient</th><th>Beta mean ± sd</th><th>reason</th></tr>{rows}</table>
<ul>{notes}</ul></div></div>{viz}</section>"""
        )
    stage_rows = "".join(f"<tr><td>{esc(k)}</td><td>{v:.1f} s</td></tr>" for k, v in timings.items())
    page = f"""<!doctype html><html lang="en"><head><meta charset="utf-8"><title>DiffGraph demo report</title>
<style>body{{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}}
table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:4px 8px;text-align:left}}
.row{{display:flex;gap:2em}}.imgs img{{width:256px;height:256px;image-rendering:pixelated;margin:2px}}
iframe{{width:100%;height:540px;border:1px solid #ccc}}.warn{{background:#fff3cd;padding:.6em 1em}}</style>
</head><body><h1>DiffGraph demo</h1>
<p class="warn"><b>The model zoo is tiny and randomly initialised: the images are noise.</b> The demo shows the
loop working end to end — crawl, register, download with hash check, calibrate, train, plan, merge, sample.</p>
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
        """Run the whole loop on a tiny random zoo and write an HTML report (no GPU, hub or server)."""
        settings = get_settings()
        target = out or settings.data_dir / "demo"
        console.print(
            "[bold yellow]Note:[/] the demo's model zoo is tiny and randomly initialised, so its images are "
            "noise; every stage runs the real code."
        )
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
        console.print(REAL_MODEL_COMMANDS, highlight=False)
