"""Offline interactive views of the expert graph (``neo4j-viz``) from plain node/relationship lists.

Used by ``diffgraph graph export --html`` and the demo report, so users without Neo4j can still explore
an expert's neighbourhood or a plan's activated subgraph.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from graphdb.store import GraphStore

MAX_VIEW_NODES = 2000
COLOURS = {  # the same palette as deploy/neo4j/style.grass, so both views read alike
    "Checkpoint": "#4C8EDA",
    "LoRA": "#F79767",
    "BaseModel": "#57C7E3",
    "Tag": "#C990C0",
    "Creator": "#8DCC93",
    "RefPrompt": "#FFC454",
    "Prompt": "#DA7194",
}


def view_of(
    store: GraphStore, expert_ids: Sequence[str] | None = None, max_nodes: int = MAX_VIEW_NODES
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Nodes and relationships for the given experts' activated subgraph (or the whole graph, capped)."""
    experts = [store.get_expert(i) for i in expert_ids] if expert_ids else store.find_experts(limit=max_nodes)
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
        add(expert.id, expert.label, expert.name, {
            "id": expert.id,
            "kind": expert.kind.value,
            "base_model": expert.base_model,
            "popularity": expert.popularity,
            "skill": expert.skill[:200],
        })
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
                add(node.id, "RefPrompt", node.text, {"id": node.id, "category": node.category, "text": node.text})
        for edge in sub.edges:
            rels.append({
                "source": edge.src,
                "target": edge.dst,
                "type": edge.type,
                "properties": {"score": round(edge.score, 4), **edge.metrics},
            })
    kept = dict(list(nodes.items())[:max_nodes])
    rels = [r for r in rels if r["source"] in kept and r["target"] in kept]
    return list(kept.values()), rels


def render_html(nodes: list[dict[str, Any]], rels: list[dict[str, Any]], height: str = "900px") -> str:
    """A self-contained HTML page (works offline) showing ``nodes``/``rels`` with neo4j-viz."""
    from neo4j_viz import Node, Relationship, VisualizationGraph

    graph = VisualizationGraph(
        nodes=[
            Node(id=n["id"], caption=n["caption"], color=COLOURS.get(n["label"]),
                 properties={"label": n["label"], **n["properties"]})
            for n in nodes
        ],
        relationships=[
            Relationship(source=r["source"], target=r["target"], caption=r["type"], properties=r.get("properties", {}))
            for r in rels
        ],
    )
    return graph.render(height=height, max_allowed_nodes=max(MAX_VIEW_NODES, len(nodes))).data
