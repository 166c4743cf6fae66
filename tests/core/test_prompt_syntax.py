"""Prompt clean-up shared by search, the offline parser and registration (``core.prompt_syntax``)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from core.prompt_syntax import (
    NetworkTag,
    clean_query,
    has_content,
    network_tags,
    strip_network_tags,
    strip_syntax,
)
from planner.parse import parse_offline


def test_clean_query_keeps_what_is_drawn() -> None:
    prompt = (
        "masterpiece, best quality, (ultra-detailed:1.2), 8k, 1girl, ((silver hair)), [red eyes], "
        "BREAK looking_at_viewer, <lora:inkStyle_v2:0.7>, embedding:EasyNegative, badhandv4, \\(cosplay\\)"
    )
    assert clean_query(prompt) == "1girl, silver hair, red eyes, looking at viewer, cosplay"
    assert strip_syntax(prompt).startswith("masterpiece, best quality, ultra-detailed, 8k, 1girl")


def test_boilerplate_only_prompts_are_empty() -> None:
    for text in ("masterpiece, best quality", "((8k, absurdres:1.3)) BREAK <lora:x:1>", "  ,, () "):
        assert not has_content(clean_query(text)), text
    assert has_content(clean_query("masterpiece, a red fox"))


def test_network_tags_and_stripping() -> None:
    text = "a fox <lora:foxStyle:0.6>, <LORA:Ink Wash>, <lyco:grain:abc> <hypernet:h:1.5> <lora::1>"
    assert network_tags(text) == [
        NetworkTag("lora", "foxStyle", 0.6),
        NetworkTag("lora", "Ink Wash", None),
        NetworkTag("lyco", "grain", None),
        NetworkTag("hypernet", "h", 1.5),
    ]
    assert strip_network_tags(text) == "a fox"


def test_offline_parser_shares_the_clean_up() -> None:
    req = parse_offline("(masterpiece:1.2), a red fox in the snow <lora:foxStyle:0.6> BREAK watercolor")
    terms = [*req.subjects, *req.styles]
    assert "watercolor" in req.styles and any("fox" in t for t in terms)
    assert not any("lora" in t or "foxstyle" in t or "break" in t for t in terms)


@settings(max_examples=50, deadline=None)
@given(st.text(max_size=300))
def test_clean_up_never_raises_and_is_bounded(text: str) -> None:
    for fn in (clean_query, strip_syntax, strip_network_tags):
        out = fn(text * 100)
        assert isinstance(out, str) and len(out) <= 20_000
    assert len(network_tags(text)) <= 32
