"""Fuzz targets: each runs the project's real code on one drawn input. A target may end with the
project's own clear error (``ALLOWED``); any other exception is a crash.

``TARGETS`` maps a name to (strategy, function); ``tests/fuzz/test_fuzz.py`` runs a derandomised sample of
each in ``make test``, ``benchmarks/fuzz.py`` runs thousands.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

from hypothesis import strategies as st
from scrapy.exceptions import DropItem

from core.types import DiffGraphError
from tests.fuzz import strategies as s

# Errors that are the project's answer to bad input: a one-line DiffGraphError (merger, graph, validation),
# or Scrapy's DropItem for a crawled record that cannot become an expert.
ALLOWED: tuple[type[BaseException], ...] = (DiffGraphError, DropItem)
API = "https://civitai.com/api/v1"
HUB = "https://huggingface.co"


@cache
def _crawler_parts(spider_name: str) -> tuple[Any, Any, Any]:
    """A spider (unstarted crawler) and the normalise/validate pipelines of a real crawl."""
    from scrapy.utils.test import get_crawler

    from core.settings import Settings
    from crawler.pipelines.normalize import NormalizePipeline
    from crawler.pipelines.validate import ValidatePipeline
    from crawler.settings import scrapy_settings
    from crawler.spiders.civitai import CivitaiSpider
    from crawler.spiders.huggingface import HuggingFaceSpider

    cls = CivitaiSpider if spider_name == "civitai" else HuggingFaceSpider
    settings = Settings(data_dir=Path(tempfile.mkdtemp(prefix="fuzz-crawl-")), crawl_item_limit=10**9,
                        civitai_api_url=API, hf_url=HUB)
    crawler = get_crawler(cls, settings_dict=scrapy_settings(settings))
    spider = cls.from_crawler(crawler)
    crawler.spider = spider
    return spider, NormalizePipeline(crawler), ValidatePipeline(crawler)


def _response(url: str, body: bytes, headers: dict[str, Any] | None = None, meta: dict | None = None) -> Any:
    from scrapy.http import Request, TextResponse

    return TextResponse(url, body=body, encoding="utf-8", request=Request(url, meta=meta or {}),
                        headers=headers or {})


def _through_pipelines(record: Any, normalize: Any, validate: Any) -> None:
    try:
        validate.process_item(normalize.process_item(record))
    except DropItem:
        pass


def civitai_page(body: bytes) -> None:
    """A listing page through the spider, each record through normalise and validate."""
    from crawler.items import SourceRecord

    spider, normalize, validate = _crawler_parts("civitai")
    for out in spider.parse(_response(f"{API}/models?limit=100", body)):
        if isinstance(out, SourceRecord):
            _through_pipelines(out, normalize, validate)


def civitai_version(data: dict) -> None:
    """The refresh path: a version then its model page (``crawl --version-id``)."""
    import json

    from crawler.items import SourceRecord

    spider, normalize, validate = _crawler_parts("civitai")
    body = json.dumps(data, allow_nan=True).encode()
    for out in spider.parse_version(_response(f"{API}/model-versions/1", body, meta={"version_id": "1"})):
        if hasattr(out, "cb_kwargs"):
            model = json.dumps({"id": 1, "modelVersions": [data]}, allow_nan=True).encode()
            for rec in spider.parse_model_of_version(_response(out.url, model), **out.cb_kwargs):
                if isinstance(rec, SourceRecord):
                    _through_pipelines(rec, normalize, validate)


def hf_page(case: tuple[bytes, Any]) -> None:
    """A ``/api/models`` listing with its ``Link`` header, then each repo's info and card."""
    import json

    from crawler.items import SourceRecord

    body, link = case
    spider, normalize, validate = _crawler_parts("huggingface")
    # header values arrive as bytes (a str here stands for its UTF-8 bytes, lone surrogates included)
    raw = link.encode("utf-8", "surrogatepass") if isinstance(link, str) else link
    headers = {"Link": raw} if isinstance(raw, bytes) else {}
    for out in spider.parse(_response(f"{HUB}/api/models?limit=100", body, headers=headers)):
        repo = getattr(out, "cb_kwargs", {}).get("repo_id")
        if repo is None:
            continue
        info = json.loads(body)[0] if body.startswith(b"[{") else {"id": repo}
        info_body = json.dumps(info if isinstance(info, dict) else {}, allow_nan=True).encode()
        for card_req in spider.parse_info(_response(out.url, info_body), repo_id=repo):
            for rec in spider.parse_card(_response(card_req.url, b"---\nlicense: mit\n---\n# card"),
                                         **card_req.cb_kwargs):
                if isinstance(rec, SourceRecord):
                    _through_pipelines(rec, normalize, validate)


def hf_record(case: tuple[Any, str | None]) -> None:
    """One repo's ``/api/models/<id>`` body and model card through the spider (``parse_info``,
    ``parse_card``), normalise and validate."""
    import json

    from crawler.items import SourceRecord

    info, card = case
    spider, normalize, validate = _crawler_parts("huggingface")
    repo = info.get("id") if isinstance(info, dict) and isinstance(info.get("id"), str) else "someone/model"
    body = json.dumps(info, allow_nan=True).encode()
    for card_req in spider.parse_info(_response(f"{HUB}/api/models/x", body), repo_id=repo):
        if not hasattr(card_req, "cb_kwargs"):
            continue
        # the card arrives as bytes (a str here stands for its UTF-8 bytes, lone surrogates included)
        raw = card.encode("utf-8", "surrogatepass") if isinstance(card, str) else b""
        for rec in spider.parse_card(_response(card_req.url, raw), **card_req.cb_kwargs):
            if isinstance(rec, SourceRecord):
                _through_pipelines(rec, normalize, validate)


def safetensors_header(data: bytes) -> None:
    """A downloaded weight file: header check, then loading every tensor."""
    from merger.safe_load import load_state_dict, read_header

    fd, name = tempfile.mkstemp(prefix="fuzz-", suffix=".safetensors")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        read_header(Path(name))
        load_state_dict(Path(name))
    finally:
        os.unlink(name)


_DTYPES = {"F16": "float16", "F32": "float32", "BF16": "bfloat16", "F64": "float64", "I64": "int64",
           "U8": "uint8", "BOOL": "bool"}


def lora_keys(layout: dict[str, tuple[str, list[int]]]) -> None:
    """A LoRA state dict with these keys, shapes and dtypes through the layout normaliser."""
    import torch

    from merger.lora import normalize_lora

    state = {k: torch.ones(shape, dtype=getattr(torch, _DTYPES.get(dtype, "float32"))) for k, (dtype, shape) in
             layout.items()}
    normalize_lora(state, {}, "fuzzed")


class _Reply:
    """An LLM client whose reply is the fuzzed text, parsed by the project's own ``parse_reply``."""

    def __init__(self, text: str) -> None:
        self.text = text

    def structured(self, system: str, user: str, schema: Any) -> Any:
        from core.llm import parse_reply

        return parse_reply(self.text, schema)


@cache
def _candidates() -> tuple[list[Any], list[Any]]:
    from graphdb.store import Candidate
    from tests.graphdb.conftest import make_expert, unit

    ckpts = [Candidate(make_expert("civitai:1", kind="checkpoint", embedding=unit(1)), 0.9)]
    loras = [Candidate(make_expert(f"civitai:{i}", embedding=unit(i)), 0.8 - i / 10) for i in (2, 3)]
    return ckpts, loras


def llm_review(text: str) -> None:
    from planner.parse import parse_offline
    from planner.review import review

    ckpts, loras = _candidates()
    selection = review("a red fox", parse_offline("a red fox"), ckpts, loras, 1, 2, llm=_Reply(text))  # type: ignore[arg-type]
    chosen = [c.candidate.expert.id for c in (*selection.checkpoints, *selection.loras)]
    assert len(chosen) == len(set(chosen)) and set(chosen) <= {"civitai:1", "civitai:2", "civitai:3"}
    assert all("\n" not in c.reason for c in (*selection.checkpoints, *selection.loras))


def llm_parse(text: str) -> None:
    from planner.parse import parse_prompt

    req, source = parse_prompt("a watercolor fox, sdxl, no text", llm=_Reply(text))  # type: ignore[arg-type]
    assert source in {"llm", "offline"} and len(req.subjects) <= 12


def llm_skills(text: str) -> None:
    from core.llm import parse_reply
    from crawler.skills import SkillReport, embedding_text, offline_report, sanitize_report, skill_text
    from tests.graphdb.conftest import make_expert

    expert = make_expert("civitai:7")
    reply = parse_reply(text, SkillReport)
    report = sanitize_report(reply) if reply is not None else offline_report(expert)
    assert "\n" not in skill_text(expert, report) and len(embedding_text(expert, report)) <= 192


TARGETS: dict[str, tuple[st.SearchStrategy[Any], Callable[[Any], None]]] = {
    "civitai_page": (s.civitai_listing(), civitai_page),
    "civitai_version": (s.mutated(s.civitai_versions()), civitai_version),
    "hf_page": (st.tuples(s.hf_listing(), s.LINK_HEADERS), hf_page),
    "hf_record": (st.tuples(s.mutated(s.hf_infos()), s.hf_card()), hf_record),
    "safetensors_header": (s.safetensors_file(), safetensors_header),
    "lora_keys": (s.lora_key_set(), lora_keys),
    "llm_review": (s.REVIEW_REPLY, llm_review),
    "llm_parse": (s.PARSE_REPLY, llm_parse),
    "llm_skills": (s.SKILL_REPLY, llm_skills),
}


def run_case(target: str, value: Any) -> None:
    """Run one case; the project's own errors count as a clean outcome."""
    try:
        TARGETS[target][1](value)
    except ALLOWED:
        pass
