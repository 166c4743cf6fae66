"""The Expert Selection Agent (parse, retrieve, review), subgraph activation, and the VGAE that predicts
each selected expert's merge coefficient as a Beta distribution."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from core.settings import Settings
    from core.types import MergePlan


def make_plan(settings: Settings, prompt: str, method: str = "vgae", seed: int = 0) -> MergePlan:
    """Plan a merge for ``prompt``: opens the graph store for the length of the call.

    ``method`` is ``vgae`` (falls back to ``similarity`` without a trained model, noted in the plan),
    ``fixed``, ``similarity`` or ``direct``. Planned experts carry ids, names, kinds, coefficients, Beta
    parameters (vgae) and reasons; ``path`` is left ``None`` for the caller to resolve.

    Raises:
        ValidationFailed: empty prompt, prompt over 10,000 characters, unknown method.
        DiffGraphError: the graph has no experts.
    """
    from core.llm import get_llm
    from graphdb.backends import store_session
    from planner.agent import ExpertSelectionAgent
    from planner.coefficients import check_method
    from planner.retrieval import validate_prompt

    prompt = validate_prompt(prompt)  # before opening anything
    check_method(method)
    with store_session(settings) as store:
        return ExpertSelectionAgent(settings, store, llm=get_llm(settings)).plan(
            prompt, method=method, seed=seed
        )


__all__ = ["make_plan"]
