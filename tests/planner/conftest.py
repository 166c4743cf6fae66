"""Planner test fixtures: an LLM client pointed at a loopback chat server."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest

from core.llm import LLMClient
from core.settings import Settings
from tests.fakes.openai_server import FakeOpenAIServer


@pytest.fixture
def llm_for(settings: Settings) -> Callable[..., object]:
    """``with llm_for(replies) as (client, server):`` a real ``LLMClient`` talking to a scripted server."""

    @contextmanager
    def make(replies: list[str | int]) -> Iterator[tuple[LLMClient, FakeOpenAIServer]]:
        with FakeOpenAIServer(replies) as server:
            cfg = settings.model_copy(
                update={
                    "llm_base_url": server.base_url,
                    "llm_model": "test-model",
                    "llm_max_retries": 1,
                    "llm_timeout_s": 10.0,
                }
            )
            yield LLMClient(cfg), server

    return make


@pytest.fixture(autouse=True)
def _one_torch_thread() -> Iterator[None]:
    """Tiny encodes and graphs run faster on one intra-op thread, and a busy 2-core CI box makes a second
    thread spin; restored after each planner test so other areas are unaffected."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
