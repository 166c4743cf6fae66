from pydantic import BaseModel, ConfigDict, Field

from core.llm import get_llm, parse_reply
from core.queue import send
from core.settings import Settings


class Reply(BaseModel):
    model_config = ConfigDict(extra="forbid")
    ids: list[str] = Field(max_length=3)
    reason: str = Field(max_length=50)


def test_parse_reply_accepts_valid_json_and_fences() -> None:
    assert parse_reply('{"ids": ["a"], "reason": "ok"}', Reply) == Reply(ids=["a"], reason="ok")
    assert parse_reply('```json\n{"ids": [], "reason": "x"}\n```', Reply) == Reply(ids=[], reason="x")


def test_parse_reply_rejects_untrusted_shapes() -> None:
    hostile = [
        "",
        "not json",
        "[1, 2]",
        '{"ids": ["a"], "reason": "ok", "cypher": "MATCH (n) DETACH DELETE n"}',  # unknown field
        '{"ids": "a", "reason": "ok"}',  # wrong type
        '{"ids": ["a", "b", "c", "d"], "reason": "ok"}',  # too many
        '{"ids": [], "reason": "' + "x" * 500 + '"}',  # too long
        "{" * 30_000,
    ]
    for text in hostile:
        assert parse_reply(text, Reply) is None, text[:40]


def test_offline_settings_have_no_llm_and_no_queue(settings: Settings) -> None:
    assert get_llm(settings) is None
    assert send(settings, "calibration.calibrate_expert", ("civitai:1",)) is None
