"""The structured requirements the Expert Selection Agent extracts from a user prompt.

The same schema validates LLM replies (untrusted: unknown fields rejected, every list and string bounded)
and the offline parser's output.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

MAX_TERMS = 12
MAX_TERM_CHARS = 80

Term = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=MAX_TERM_CHARS)]
Family = Literal["sd15", "sd2", "sdxl", "pony", "illustrious", "noobai", "flux", "flux-schnell"]  # core.families


class Requirements(BaseModel):
    """What the user asked for: subjects, styles, quality aspects, a base-family hint, what to avoid."""

    model_config = ConfigDict(extra="forbid")

    subjects: list[Term] = Field(default_factory=list, max_length=MAX_TERMS)
    styles: list[Term] = Field(default_factory=list, max_length=MAX_TERMS)
    quality: list[Term] = Field(default_factory=list, max_length=MAX_TERMS)
    base_family_hint: Family | None = None
    avoid: list[Term] = Field(default_factory=list, max_length=MAX_TERMS)

    def positive_terms(self) -> list[str]:
        """Subjects and styles, deduplicated in order: the extra retrieval queries besides the prompt."""
        seen: dict[str, None] = {}
        for term in (*self.subjects, *self.styles):
            seen.setdefault(term.lower(), None)
        return list(seen)
