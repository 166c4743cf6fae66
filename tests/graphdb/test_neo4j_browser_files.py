"""The Neo4j Browser files in ``deploy/neo4j/``: a style rule per label and relationship type."""

from __future__ import annotations

import re
from pathlib import Path

from graphdb.store import NODE_LABELS, REL_TYPES

DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "neo4j"


def grass_rules() -> dict[tuple[str, str], dict[str, str]]:
    text = re.sub(r"/\*.*?\*/", "", (DEPLOY / "style.grass").read_text(), flags=re.S)
    rules = {}
    for kind, name, body in re.findall(r"^(node|relationship)(?:\.(\w+))?\s*\{(.*?)^\}", text, flags=re.S | re.M):
        props = dict(re.findall(r"([\w-]+)\s*:\s*([^;]+);", body))
        rules[(kind, name)] = {k: v.strip() for k, v in props.items()}
    return rules


def test_every_label_has_a_caption_and_a_colour_of_its_own() -> None:
    rules = grass_rules()
    colours = set()
    for label in NODE_LABELS:
        rule = rules[("node", label)]
        assert re.fullmatch(r'"\{\w+\}"', rule["caption"]), label
        assert re.fullmatch(r"#[0-9A-Fa-f]{6}", rule["color"]), label
        colours.add(rule["color"].upper())
    assert len(colours) == len(NODE_LABELS)


def test_every_relationship_type_has_a_caption() -> None:
    rules = grass_rules()
    for rel in REL_TYPES:
        assert rules[("relationship", rel)]["caption"].strip('"') in {"<type>", "{score}", "{coefficient}"}, rel
    assert rules[("relationship", "CAPABILITY")]["caption"] == '"{score}"'
    assert rules[("relationship", "USED")]["caption"] == '"{coefficient}"'


def test_kind_labels_come_after_expert_so_they_win() -> None:
    text = (DEPLOY / "style.grass").read_text()
    assert text.index("node.Expert {") < text.index("node.Checkpoint {") < text.index("node.LoRA {")
