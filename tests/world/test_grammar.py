"""The world's grammar, prompt sets and settings plumbing (no trained weights needed)."""

from __future__ import annotations

import random

from world import grammar, prompts


def test_prompts_name_their_ground_truth() -> None:
    rng = random.Random(3)
    for _ in range(300):
        spec = grammar.sample_spec(rng)
        text = grammar.full_prompt(spec, rng, drop=0.5)
        for attr, value in grammar.parse(text).items():
            assert getattr(spec, attr) == value, text
        assert grammar.parse(text)["shape"] == spec.shape


def test_parse_prefers_the_longest_paraphrase() -> None:
    assert grammar.parse("a hot pink crescent moon on a checkerboard background, retro pixel style") == {
        "shape": "moon", "colour": "neon pink", "background": "checkered", "style": "pixel"}
    assert grammar.parse("a red square on a plain white background") == {
        "shape": "square", "colour": "red", "background": "plain white"}


def test_renders_differ_per_attribute() -> None:
    base = grammar.Spec("circle", "red", "plain white", "flat")
    img = grammar.render(base)
    assert img.size == (grammar.SIZE, grammar.SIZE)
    for attr in grammar.ATTRIBUTES:
        for value in grammar.VALUES[attr]:
            if value != getattr(base, attr):
                other = grammar.render(grammar.Spec(**{**base.attrs(), attr: value}))
                assert other.tobytes() != img.tobytes(), (attr, value)


def test_prompt_sets_are_disjoint_and_deterministic() -> None:
    sets = {name: prompts.load_set(name) for name in prompts.SETS}
    seen: set[str] = set()
    for name, ps in sets.items():
        assert ps and len(set(ps)) == len(ps), name
        assert not seen & set(ps), name
        seen |= set(ps)
        assert prompts.load_set(name) == ps
    for p in sets["compositional-heldout"]:
        parsed = grammar.parse(p)
        assert sum(parsed[a] in grammar.RARE[a] for a in parsed) >= 2, p


def test_data_dir_toml_is_lowest_precedence_and_cannot_move_the_data_dir(settings, tmp_path, monkeypatch) -> None:
    from core.settings import Settings

    (settings.data_dir).mkdir(parents=True, exist_ok=True)
    (settings.data_dir / "diffgraph.toml").write_text(
        'data_dir = "/somewhere/else"\ngen_steps = 7\ngen_guidance = 2.5\n[base_models]\nsd15 = "/m/base.safetensors"\n')
    monkeypatch.setenv("DIFFGRAPH_GEN_GUIDANCE", "3.5")
    monkeypatch.delenv("DIFFGRAPH_GEN_STEPS", raising=False)  # the fixture's explicit budget would win over the file
    s = Settings()
    assert s.data_dir == settings.data_dir
    assert s.gen_steps == 7 and s.gen_guidance == 3.5
    assert s.base_models == {"sd15": "/m/base.safetensors"}
