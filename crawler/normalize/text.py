"""Untrusted HTML → bounded plain text (never executed, scripts and styles dropped)."""

from __future__ import annotations

import html
import re
from html.parser import HTMLParser

DESCRIPTION_CAP = 8000
MAX_HTML_INPUT = 1_000_000  # characters parsed at most; the rest is never looked at

_SKIP = {"script", "style", "noscript", "iframe", "object", "embed", "template", "svg", "head", "title"}
_BLOCK = {"p", "div", "br", "li", "ul", "ol", "h1", "h2", "h3", "h4", "h5", "h6", "tr", "blockquote", "pre", "hr"}
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
_SPACES = re.compile(r"[ \t\u00a0]+")
_NEWLINES = re.compile(r"\n\s*\n+")
_SENTENCE = re.compile(r"(?<=[.!?。！？])\s+")


class _TextExtractor(HTMLParser):
    def __init__(self, cap: int) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.size = 0
        self.cap = cap
        self.skip_depth = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in _SKIP:
            self.skip_depth += 1
        elif tag in _BLOCK:
            self.parts.append("\n")

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in _BLOCK:
            self.parts.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in _SKIP:
            self.skip_depth = max(0, self.skip_depth - 1)
        elif tag in _BLOCK:
            self.parts.append("\n")

    def handle_data(self, data: str) -> None:
        if self.skip_depth or self.size > self.cap * 2:
            return
        self.parts.append(data)
        self.size += len(data)


def html_to_text(raw: str | None, cap: int = DESCRIPTION_CAP) -> str:
    """Visible text of an HTML fragment, whitespace-collapsed and cut to ``cap`` characters.

    Content of ``script``/``style``/``iframe``... is dropped; entities are decoded; control characters removed.
    Plain text input passes through unchanged apart from whitespace.
    """
    if not raw:
        return ""
    source = str(raw)[:MAX_HTML_INPUT]
    parser = _TextExtractor(cap)
    try:
        parser.feed(source)
        parser.close()
        text = "".join(parser.parts)
    except Exception:  # malformed markup: fall back to a tag strip, still never executed
        text = html.unescape(re.sub(r"<[^>]*>", " ", source))
    text = _CONTROL.sub("", text)
    lines = [_SPACES.sub(" ", line).strip() for line in text.splitlines()]
    text = _NEWLINES.sub("\n\n", "\n".join(lines)).strip()
    return _cut(text, cap)


def _cut(text: str, cap: int) -> str:
    if len(text) <= cap:
        return text
    cut = text[:cap]
    space = cut.rfind(" ")
    return (cut[:space] if space > cap * 0.8 else cut).rstrip() + "…"


def first_sentences(text: str, n: int = 2, cap: int = 400) -> str:
    """The first ``n`` sentences of plain text (at most ``cap`` characters)."""
    flat = " ".join(text.split())
    if not flat:
        return ""
    return _cut(" ".join(_SENTENCE.split(flat)[:n]), cap)


def clean_line(value: object, cap: int) -> str:
    """One line of untrusted text: no control characters, collapsed whitespace, bounded."""
    text = _CONTROL.sub("", html.unescape(str(value or "")))
    return " ".join(text.split())[:cap]
