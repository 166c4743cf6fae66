"""Structured calls to any OpenAI-compatible chat endpoint.

LLM replies are untrusted: each reply is parsed as JSON and validated against a pydantic schema
(unknown fields rejected, lengths bounded). Callers get ``None`` when no valid reply was obtained and
must then use their offline fallback.
"""

from __future__ import annotations

import json
import logging
import re
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from core.settings import Settings

log = logging.getLogger(__name__)
T = TypeVar("T", bound=BaseModel)

MAX_REPLY_CHARS = 20_000
_FENCE = re.compile(r"^```(?:json)?\s*|\s*```$", re.MULTILINE)


def parse_reply(text: str, schema: type[T]) -> T | None:
    """Validate one reply; ``None`` when it is not a JSON object matching ``schema``."""
    if not text or len(text) > MAX_REPLY_CHARS:
        return None
    body = _FENCE.sub("", text.strip())
    try:
        data = json.loads(body)
    except json.JSONDecodeError:
        return None
    if not isinstance(data, dict):
        return None
    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        log.info("LLM reply rejected by %s: %s", schema.__name__, exc.error_count())
        return None


class LLMClient:
    """A thin wrapper over ``openai.OpenAI`` that only ever returns schema-valid objects."""

    def __init__(self, settings: Settings) -> None:
        from openai import OpenAI

        self.model = settings.llm_model
        self.max_retries = max(0, settings.llm_max_retries)
        self._client = OpenAI(
            base_url=settings.llm_base_url,
            api_key=settings.llm_api_key.get_secret_value() or "none",
            timeout=settings.llm_timeout_s,
            max_retries=1,
        )

    def structured(self, system: str, user: str, schema: type[T], breaker: Any = None) -> T | None:
        """Ask for a JSON object matching ``schema``; bounded retries, ``None`` on failure.

        ``breaker`` (a ``CircuitBreaker``): while it is open no call is made; each transport failure and
        each reply is reported to it, so a down endpoint is skipped instead of timing out per call."""
        messages = [
            {
                "role": "system",
                "content": system
                + "\nReply with one JSON object only, matching this JSON schema:\n"
                + json.dumps(schema.model_json_schema()),
            },
            {"role": "user", "content": user},
        ]
        for attempt in range(self.max_retries + 1):
            if breaker is not None and not breaker.allow():
                return None
            try:
                resp = self._client.chat.completions.create(
                    model=self.model,
                    messages=messages,
                    temperature=0,
                    response_format={"type": "json_object"},
                )
            except Exception as exc:  # network, HTTP and protocol errors all mean "fall back"
                log.warning("LLM call failed (attempt %d): %s", attempt + 1, exc)
                if breaker is not None:
                    breaker.failure(exc)
                continue
            if breaker is not None:
                breaker.success()
            content = (resp.choices[0].message.content or "") if resp.choices else ""
            parsed = parse_reply(content, schema)
            if parsed is not None:
                return parsed
            log.info("LLM reply invalid (attempt %d)", attempt + 1)
        return None


def get_llm(settings: Settings) -> LLMClient | None:
    """The configured client, or ``None`` when offline."""
    return LLMClient(settings) if settings.llm_enabled else None
