"""The Expert Selection Agent and ``make_plan`` against the real embedded store."""

from __future__ import annotations

import pytest

from core.types import DiffGraphError, MergePlan, ValidationFailed
from graphdb.store import store_session
from planner import make_plan
from planner.agent import ExpertSelectionAgent
from planner.coefficients import SIMILARITY_FALLBACK_NOTE
from planner.retrieval import search_experts
from planner.train import train_planner
from tests.planner.graphs import build_planted_graph, build_themed_graph

PROMPT = "a cute cat in a neon cyberpunk city at night, watercolor painting"


@pytest.fixture
def themed(settings, embedder):
    return build_themed_graph(settings, embedder)


def _without_timings(plan: MergePlan) -> dict:
    return plan.model_dump(mode="json", exclude={"timings"})


def test_plan_picks_matching_experts_within_one_family(settings, themed) -> None:
    plan = make_plan(settings, PROMPT, method="similarity", seed=7)
    assert plan.base_family == "sd15" and plan.method == "similarity" and plan.seed == 7
    lora_ids = {e.expert_id for e in plan.loras}
    assert "civitai:203" in lora_ids and "civitai:201" in lora_ids  # cats, cyberpunk
    assert "civitai:206" not in lora_ids  # nsfw filtered (allow_nsfw is off)
    assert "civitai:207" not in lora_ids  # sdxl: another family
    assert len(plan.checkpoints) <= settings.k_ckpt and len(plan.loras) <= settings.k_lora
    assert sum(e.coefficient for e in plan.checkpoints) == pytest.approx(1.0, abs=1e-5)
    assert all(0.0 <= e.coefficient <= settings.lora_max_weight for e in plan.loras)
    assert all(e.reason and e.path is None for e in plan.experts)
    assert {"parse", "embed", "retrieve", "review", "coefficients"} <= set(plan.timings)
    # the two watercolour LoRAs are near-duplicates: MMR keeps at most one of them
    assert len(lora_ids & {"civitai:202", "civitai:204"}) <= 1
    (cats,) = [e for e in plan.loras if e.expert_id == "civitai:203"]
    assert "closest requirement 'cute cat'" in cats.reason and "retrieval score" in cats.reason


def test_plans_are_deterministic_for_a_fixed_seed(settings, themed) -> None:
    first = make_plan(settings, PROMPT, seed=3)
    second = make_plan(settings, PROMPT, seed=3)
    assert _without_timings(first) == _without_timings(second)


def test_vgae_without_a_trained_model_falls_back_and_says_so(settings, themed) -> None:
    plan = make_plan(settings, PROMPT, method="vgae")
    assert SIMILARITY_FALLBACK_NOTE in plan.notes and SIMILARITY_FALLBACK_NOTE.startswith("fallback:")
    assert plan.method == "similarity"  # the method actually used, not the one asked for
    similarity = make_plan(settings, PROMPT, method="similarity")
    assert [(e.expert_id, e.coefficient) for e in plan.experts] == [
        (e.expert_id, e.coefficient) for e in similarity.experts
    ]


def test_baselines_direct_and_fixed(settings, themed) -> None:
    direct = make_plan(settings, PROMPT, method="direct")
    assert direct.experts == [] and direct.base_family == "sd15"
    fixed = make_plan(settings, PROMPT, method="fixed")
    n = len(fixed.loras)
    assert n >= 2 and all(e.coefficient == pytest.approx(settings.lora_max_weight / n) for e in fixed.loras)


def test_family_hint_and_trigger_words(settings, themed) -> None:
    xl = make_plan(settings, "neon cyberpunk city at night, sdxl", method="fixed")
    assert xl.base_family == "sdxl" and {e.expert_id for e in xl.loras} == {"civitai:207"}
    ranking = search_experts(settings, "a knight standing in a field, pxknight", kind="lora", k=3)
    assert ranking[0].expert.id == "civitai:205"  # its trigger word is in the prompt
    knight = make_plan(settings, "a knight standing in a field, pxknight", method="fixed")
    (pk,) = [e for e in knight.loras if e.expert_id == "civitai:205"]
    assert "trigger word 'pxknight' in the prompt" in pk.reason


def test_nsfw_experts_appear_only_when_allowed(settings, themed) -> None:
    nsfw_ids = lambda s: {c.expert.id for c in search_experts(s, "cute cats", kind="lora", k=10)}  # noqa: E731
    assert "civitai:206" not in nsfw_ids(settings)
    assert "civitai:206" in nsfw_ids(settings.model_copy(update={"allow_nsfw": True}))


def test_vgae_plan_after_training(settings, embedder) -> None:
    planted = build_planted_graph(settings, embedder, informative=True)
    train_planner(settings, epochs=20, seed=0)
    with store_session(settings) as store:
        agent = ExpertSelectionAgent(settings, store, embedder=embedder)
        plan = agent.plan("a grey cat hunting a mouse in the garden", method="vgae", seed=0)
        again = agent.plan("a grey cat hunting a mouse in the garden", method="vgae", seed=0)
    assert _without_timings(plan) == _without_timings(again)
    assert plan.experts, plan.notes
    assert any(n.startswith("coefficients: VGAE") for n in plan.notes)
    assert {"subgraph", "vgae"} <= set(plan.timings)
    for e in plan.experts:
        assert e.alpha > 0 and e.beta > 0 and 0 < e.mean < 1 and e.std > 0
    if plan.checkpoints:  # solo capability says how to share, not how much to add: shares sum to 1
        assert sum(e.coefficient for e in plan.checkpoints) == pytest.approx(1.0, abs=1e-5)
    total = sum(e.mean for e in plan.loras)
    for e in plan.loras:  # normalised like fixed/similarity: strengths sum to lora_max_weight
        assert e.coefficient == pytest.approx(settings.lora_max_weight * e.mean / total, abs=1e-5)
    assert planted["experts"]


@pytest.mark.parametrize(
    ("prompt", "message"),
    [("", "prompt is empty"), ("   \n\t", "prompt is empty"), ("x" * 10_001, "prompt is too long")],
)
def test_bad_prompts_are_clear_errors(settings, themed, prompt, message) -> None:
    with pytest.raises(ValidationFailed, match=message):
        make_plan(settings, prompt)


def test_empty_graph_is_a_clear_error(settings) -> None:
    with pytest.raises(DiffGraphError, match="the expert graph is empty"):
        make_plan(settings, "a cat")


def test_unknown_method_is_a_clear_error(settings, themed) -> None:
    with pytest.raises(ValidationFailed, match="unknown planner method"):
        make_plan(settings, "a cat", method="best")


def test_plan_with_an_llm_parses_and_reviews_through_the_real_client(settings, themed) -> None:
    import json

    from tests.fakes.openai_server import FakeOpenAIServer

    parse_reply = json.dumps({"subjects": ["cat"], "styles": ["watercolor"], "quality": [], "avoid": []})
    review_reply = json.dumps(
        {
            "selected": [
                {"id": "civitai:202", "reason": "watercolour look"},
                {"id": "civitai:999", "reason": "not a candidate"},
                {"id": "civitai:102", "reason": "soft illustration base"},
            ]
        }
    )
    with FakeOpenAIServer([parse_reply, review_reply]) as server:
        cfg = settings.model_copy(update={"llm_base_url": server.base_url, "llm_model": "test-model"})
        plan = make_plan(cfg, "a cat, watercolor", method="fixed")
        assert len(server.requests) == 2
        review_request = json.loads(server.requests[1]["messages"][-1]["content"])
    assert "requirements: llm parser" in plan.notes and "review: LLM" in plan.notes
    assert [e.expert_id for e in plan.loras] == ["civitai:202"]
    assert [e.expert_id for e in plan.checkpoints] == ["civitai:102"]
    assert plan.loras[0].reason.startswith("LLM: watercolour look; closest requirement 'watercolor'")
    assert all("capability_highlights" in c for c in review_request["loras"])


def test_retrain_task_skips_unchanged_data(settings, embedder) -> None:
    from planner.tasks import retrain_if_changed

    build_planted_graph(settings, embedder)
    first = retrain_if_changed(settings, epochs=3, seed=0)
    again = retrain_if_changed(settings, epochs=3, seed=0)
    forced = retrain_if_changed(settings, epochs=3, seed=0, force=True)
    assert first["trained"] and not again["trained"] and forced["trained"]
    assert again["version"] == first["version"] != forced["version"]
