"""``diffgraph graph ...``: inspect the expert graph (counts, one expert's neighbourhood, an HTML view).

Every command goes through the ``GraphStore`` contract, so it works on both backends, and holds the
store only for the length of the command (the embedded database admits one process at a time).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from core.cli import console, out, print_json, user_errors
from core.settings import get_settings
from graphdb.viz import MAX_VIEW_NODES, render_html, view_of

graph_app = typer.Typer(help="Inspect the expert graph.", no_args_is_help=True)


@graph_app.command("stats")
def stats_command(
    as_json: Annotated[
        bool, typer.Option("--json", help="Print {nodes: {...}, relationships: {...}} as JSON.")
    ] = False,
) -> None:
    """Count nodes per label and relationships per type."""
    from graphdb.backends import store_session

    with user_errors(), store_session(get_settings()) as store:
        stats = store.stats()
    if as_json:
        print_json(stats.to_json())
        return
    from rich.table import Table

    for title, counts in (("nodes", stats.nodes), ("relationships", stats.relationships)):
        table = Table(title=title)
        table.add_column("label" if title == "nodes" else "type")
        table.add_column("count", justify="right")
        for name, count in counts.items():
            table.add_row(name, str(count))
        out.print(table)


@graph_app.command("show")
def show_command(expert_id: Annotated[str, typer.Argument(help="Expert id, e.g. civitai:128713.")]) -> None:
    """Show one expert with its base model, tags, creator, capabilities and similar experts."""
    from graphdb.backends import store_session

    with user_errors(), store_session(get_settings()) as store:
        expert = store.get_expert(expert_id)
        capabilities = store.get_capabilities(expert_id=expert_id)
        prompts = {p.id: p for p in store.list_ref_prompts()}
        sub = store.activate_subgraph([expert_id])
    from rich.text import Text
    from rich.tree import Tree

    def plain(text: str) -> Text:  # data is never rich markup (names may contain "[...]")
        return Text(text.replace("\n", " "))

    tree = Tree(Text.assemble((expert.name, "bold"), " ", (expert.id, "dim"), f" :{expert.label}"))
    fields = tree.add("fields")
    for name in (
        "kind",
        "source",
        "version_name",
        "base_model",
        "url",
        "skill",
        "license",
        "allow_commercial_use",
        "nsfw",
        "downloads",
        "likes",
        "rating",
        "popularity",
        "recommended_weight",
        "content_hash",
        "calibrated_at",
        "ref_set_version",
        "scorer_version",
    ):
        value = getattr(expert, name)
        if value not in ("", None):
            fields.add(plain(f"{name}: {value}"))
    if expert.primary_file is not None:
        fields.add(plain(f"file: {expert.primary_file.name} sha256={expert.primary_file.sha256 or '?'}"))
    tree.add(
        plain(f"BASED_ON → {expert.base_family}" + (" (family unknown)" if not expert.family_known else ""))
    )
    tags = tree.add(f"TAGGED → {len(expert.tags)} tag(s)")
    for tag in expert.tags:
        tags.add(plain(tag))
    if expert.creator:
        tree.add(plain(f"CREATED_BY → {expert.creator}"))
    caps = tree.add(f"CAPABILITY → {len(capabilities)} reference prompt(s)")
    for cap in sorted(capabilities, key=lambda c: (-c.score, c.prompt_id)):
        prompt = prompts.get(cap.prompt_id)
        metrics = " ".join(f"{k}={v:+.3f}" for k, v in sorted(cap.metrics.items()))
        caps.add(
            plain(
                f"{cap.score:.3f}  {prompt.text[:70] if prompt else cap.prompt_id}"
                f"{f' [{prompt.category}]' if prompt else ''}  {metrics}  "
                f"({cap.n_images} images, {cap.calibrated_at:%Y-%m-%d %H:%M}, set {cap.ref_set_version})"
            )
        )
    names = {n.id: n.text for n in sub.nodes}
    similar_edges = sorted(
        (e for e in sub.edges if e.type == "SIMILAR_TO"), key=lambda e: (-e.score, e.src, e.dst)
    )
    similar = tree.add(f"SIMILAR_TO → {len(similar_edges)} edge(s)")
    for edge in similar_edges:
        outgoing = edge.src == expert_id
        other = edge.dst if outgoing else edge.src
        similar.add(plain(f"{'→' if outgoing else '←'} {edge.score:.3f}  {other}  {names.get(other, '')}"))
    out.print(tree, crop=False, highlight=False)


@graph_app.command("export")
def export_command(
    html: Annotated[
        Path, typer.Option("--html", help="Write an interactive, offline HTML view to this file.")
    ],
    expert: Annotated[str | None, typer.Option("--expert", help="Only this expert's neighbourhood.")] = None,
    max_nodes: Annotated[
        int, typer.Option("--max-nodes", min=1, help="Cap on nodes in the view.")
    ] = MAX_VIEW_NODES,
) -> None:
    """Write the graph (capped) or one expert's neighbourhood as an interactive HTML page (neo4j-viz)."""
    from graphdb.backends import store_session

    with user_errors():
        if html.exists() and html.is_dir():
            raise ValueError(f"{html} is a directory")
        with store_session(get_settings()) as store:
            nodes, rels = view_of(store, [expert] if expert else None, max_nodes)
        page = render_html(nodes, rels)
        html.parent.mkdir(parents=True, exist_ok=True)
        html.write_text(page, encoding="utf-8")
    console.print(
        f"wrote {len(nodes)} nodes and {len(rels)} relationships to {html}", highlight=False, markup=False
    )


def register(app: typer.Typer) -> None:
    """Add the ``graph`` command group to the ``diffgraph`` app."""
    app.add_typer(graph_app, name="graph")
