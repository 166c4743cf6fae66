"""``diffgraph graph ...``: inspect the expert graph (counts, one expert's neighbourhood, an HTML view).

Every command goes through the ``GraphStore`` contract, so it works on both backends, and holds the
store only for the length of the command (the embedded database admits one process at a time).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from core.cli import console, out, print_json, user_errors
from core.settings import get_settings

if TYPE_CHECKING:
    from graphdb.store import GraphStore

MAX_EXPORT_NODES = 2000
_COLOURS = {
    "Checkpoint": "#4C8EDA",
    "LoRA": "#F79767",
    "BaseModel": "#57C7E3",
    "Tag": "#C990C0",
    "Creator": "#8DCC93",
    "RefPrompt": "#FFC454",
}

graph_app = typer.Typer(help="Inspect the expert graph.", no_args_is_help=True)


@graph_app.command("stats")
def stats_command(
    as_json: Annotated[
        bool, typer.Option("--json", help="Print {nodes: {...}, relationships: {...}} as JSON.")
    ] = False,
) -> None:
    """Count nodes per label and relationships per type."""
    from graphdb.store import store_session

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
    from graphdb.store import store_session

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


def _viz_graph(store: GraphStore, expert_id: str | None, max_nodes: int) -> tuple[list[dict], list[dict]]:
    """Nodes and relationships (plain dicts) for the whole graph (capped) or one expert's neighbourhood."""
    if expert_id is not None:
        experts = [store.get_expert(expert_id)]
    else:
        experts = store.find_experts(limit=max_nodes)
    sub = store.activate_subgraph([e.id for e in experts]) if experts else None
    known = {e.id: e for e in experts}
    if sub is not None:
        for node in sub.nodes:  # SIMILAR_TO neighbours outside the first selection
            if node.node_type in {"checkpoint", "lora"} and node.id not in known:
                known[node.id] = store.get_expert(node.id)
    nodes: dict[str, dict[str, Any]] = {}
    rels: list[dict[str, Any]] = []

    def add(node_id: str, label: str, caption: str, props: dict[str, Any]) -> None:
        if node_id not in nodes:
            nodes[node_id] = {"id": node_id, "label": label, "caption": caption[:40], "properties": props}

    for expert in known.values():
        add(
            expert.id,
            expert.label,
            expert.name,
            {
                "id": expert.id,
                "kind": expert.kind.value,
                "base_model": expert.base_model,
                "popularity": expert.popularity,
                "skill": expert.skill[:200],
            },
        )
        if expert.base_family:
            add(f"base:{expert.base_family}", "BaseModel", expert.base_family, {"name": expert.base_family})
            rels.append({"source": expert.id, "target": f"base:{expert.base_family}", "type": "BASED_ON"})
        for tag in expert.tags:
            add(f"tag:{tag}", "Tag", tag, {"name": tag})
            rels.append({"source": expert.id, "target": f"tag:{tag}", "type": "TAGGED"})
        if expert.creator:
            add(f"creator:{expert.creator}", "Creator", expert.creator, {"name": expert.creator})
            rels.append({"source": expert.id, "target": f"creator:{expert.creator}", "type": "CREATED_BY"})
    if sub is not None:
        for node in sub.nodes:
            if node.node_type == "refprompt":
                add(
                    node.id,
                    "RefPrompt",
                    node.text,
                    {"id": node.id, "category": node.category, "text": node.text},
                )
        for edge in sub.edges:
            rels.append(
                {
                    "source": edge.src,
                    "target": edge.dst,
                    "type": edge.type,
                    "properties": {"score": round(edge.score, 4), **edge.metrics},
                }
            )
    kept = dict(list(nodes.items())[:max_nodes])
    rels = [r for r in rels if r["source"] in kept and r["target"] in kept]
    return list(kept.values()), rels


@graph_app.command("export")
def export_command(
    html: Annotated[
        Path, typer.Option("--html", help="Write an interactive, offline HTML view to this file.")
    ],
    expert: Annotated[str | None, typer.Option("--expert", help="Only this expert's neighbourhood.")] = None,
    max_nodes: Annotated[
        int, typer.Option("--max-nodes", min=1, help="Cap on nodes in the view.")
    ] = MAX_EXPORT_NODES,
) -> None:
    """Write the graph (capped) or one expert's neighbourhood as an interactive HTML page (neo4j-viz)."""
    from graphdb.store import store_session

    with user_errors():
        if html.exists() and html.is_dir():
            raise ValueError(f"{html} is a directory")
        with store_session(get_settings()) as store:
            nodes, rels = _viz_graph(store, expert, max_nodes)
        from neo4j_viz import Node, Relationship, VisualizationGraph

        graph = VisualizationGraph(
            nodes=[
                Node(
                    id=n["id"],
                    caption=n["caption"],
                    color=_COLOURS.get(n["label"]),
                    properties={"label": n["label"], **n["properties"]},
                )
                for n in nodes
            ],
            relationships=[
                Relationship(
                    source=r["source"],
                    target=r["target"],
                    caption=r["type"],
                    properties=r.get("properties", {}),
                )
                for r in rels
            ],
        )
        page = graph.render(height="900px", max_allowed_nodes=max(max_nodes, len(nodes)))
        html.parent.mkdir(parents=True, exist_ok=True)
        html.write_text(page.data, encoding="utf-8")
    console.print(
        f"wrote {len(nodes)} nodes and {len(rels)} relationships to {html}", highlight=False, markup=False
    )


def register(app: typer.Typer) -> None:
    """Add the ``graph`` command group to the ``diffgraph`` app."""
    app.add_typer(graph_app, name="graph")
