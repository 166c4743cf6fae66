"""Domain types shared by every package (pydantic models, JSON-serialisable).

Identifiers: an expert's ``id`` is ``"<source>:<version id>"`` (``civitai:128713``,
``huggingface:user/repo``, ``local:<sha256 prefix>``), stable across re-crawls.
"""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    computed_field,
    field_validator,
    model_validator,
)

MAX_TEXT = 20_000  # upper bound for any free text stored on a node
MAX_SHORT = 512
# The one bound on a user's prompt (API, CLI, planner). The sampler reads fewer characters
# (``merger.generate.MAX_SAMPLER_PROMPT_CHARS``: its text encoder sees 77 tokens) and the graph stores up to
# ``MAX_TEXT`` of any free text; neither is a second prompt limit.
MAX_PROMPT_CHARS = 10_000
MAX_SHOWCASE_PROMPTS = 8
MAX_SHOWCASE_CHARS = 500


def utcnow() -> datetime:
    return datetime.now(UTC)


class ExpertKind(StrEnum):
    checkpoint = "checkpoint"
    lora = "lora"
    locon = "locon"
    loha = "loha"
    lokr = "lokr"
    embedding = "embedding"  # textual inversion (Civitai type TextualInversion): new tokens, no weight change

    @property
    def is_adapter(self) -> bool:
        """A LoRA-family adapter (fused into weights)."""
        return self not in (ExpertKind.checkpoint, ExpertKind.embedding)

    @property
    def label(self) -> str:
        """The Neo4j label of this kind (``:Checkpoint``, ``:LoRA`` or ``:Embedding``)."""
        return {ExpertKind.checkpoint: "Checkpoint", ExpertKind.embedding: "Embedding"}.get(self, "LoRA")


class ExpertFile(BaseModel):
    """A downloadable weight file of an expert, as the source describes it."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(max_length=MAX_SHORT)
    url: str = Field(default="", max_length=4096)
    sha256: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")
    autov2: str | None = Field(default=None, max_length=64)
    size_bytes: int | None = Field(default=None, ge=0)
    format: str = "SafeTensor"  # SafeTensor | PickleTensor | Diffusers | Other
    primary: bool = True
    pickle_scan: str | None = None
    virus_scan: str | None = None

    @field_validator("sha256", mode="before")
    @classmethod
    def _lower(cls, v: Any) -> Any:
        return v.lower() if isinstance(v, str) else v

    @property
    def is_safetensors(self) -> bool:
        return self.format.lower() in {"safetensor", "safetensors", "diffusers"} or self.name.endswith(
            ".safetensors"
        )


class Expert(BaseModel):
    """A community expert (one checkpoint or adapter *version*) as registered in the graph."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(min_length=3, max_length=MAX_SHORT)
    source: str = Field(max_length=64)  # civitai | huggingface | local
    source_model_id: str = Field(default="", max_length=MAX_SHORT)
    source_version_id: str = Field(default="", max_length=MAX_SHORT)
    name: str = Field(max_length=MAX_SHORT)
    version_name: str = Field(default="", max_length=MAX_SHORT)
    kind: ExpertKind
    base_model: str = Field(default="", max_length=128)  # raw source string, e.g. "SD 1.5"
    base_family: str = Field(default="unknown", max_length=64)  # sd15 | sd2 | sdxl | flux | ... | raw
    family_known: bool = True
    url: str = Field(default="", max_length=4096)
    description: str = Field(default="", max_length=MAX_TEXT)  # plain text
    skill: str = Field(default="", max_length=MAX_TEXT)  # registered skill description
    skills: list[str] = Field(default_factory=list, max_length=64)
    subjects: list[str] = Field(default_factory=list, max_length=64)
    styles: list[str] = Field(default_factory=list, max_length=64)
    trained_words: list[str] = Field(default_factory=list, max_length=64)
    tags: list[str] = Field(default_factory=list, max_length=64)
    # cleaned prompts of the source's showcase images (untrusted text, bounded): retrieval evidence
    showcase_prompts: list[Annotated[str, StringConstraints(max_length=MAX_SHOWCASE_CHARS)]] = Field(
        default_factory=list, max_length=MAX_SHOWCASE_PROMPTS
    )
    creator: str = Field(default="", max_length=MAX_SHORT)
    nsfw: bool = False
    nsfw_level: int = 0
    license: str = Field(default="", max_length=MAX_SHORT)
    allow_commercial_use: str = Field(default="", max_length=MAX_SHORT)
    allow_derivatives: bool = True
    allow_no_credit: bool = True
    downloads: int = 0
    likes: int = 0
    rating: float = 0.0
    popularity: float = 0.0  # normalised to [0, 1] by the crawler
    recommended_weight: float | None = None  # LoRA strength suggested by the source
    files: list[ExpertFile] = Field(default_factory=list, max_length=32)
    embedding: list[float] | None = None
    content_hash: str = ""  # hash of the source record; a change triggers recalibration
    created_at: datetime | None = None
    updated_at: datetime | None = None
    calibrated_at: datetime | None = None
    ref_set_version: str = ""
    scorer_version: str = ""

    @property
    def label(self) -> str:
        return self.kind.label

    @property
    def primary_file(self) -> ExpertFile | None:
        safes = [f for f in self.files if f.is_safetensors]
        for pool in (safes, self.files):
            for f in pool:
                if f.primary:
                    return f
            if pool:
                return pool[0]
        return None


class RefPrompt(BaseModel):
    """A reference prompt that experts are calibrated on."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(max_length=MAX_SHORT)
    category: str = Field(max_length=64)
    text: str = Field(max_length=4000)
    set_version: str = "v1"
    source: str = ""  # provenance (dataset and row)
    embedding: list[float] | None = None


class Capability(BaseModel):
    """A measured capability edge ``(:Expert)-[:CAPABILITY]->(:RefPrompt)``."""

    model_config = ConfigDict(extra="forbid")

    expert_id: str
    prompt_id: str
    score: float  # normalised gain over the base, in [0, 1]
    metrics: dict[str, float] = Field(default_factory=dict)  # e.g. {"clip_gain": 0.03}
    n_images: int = 0
    calibrated_at: datetime = Field(default_factory=utcnow)
    ref_set_version: str = "v1"


class PlannedExpert(BaseModel):
    """One expert of a merge plan with its coefficient."""

    model_config = ConfigDict(extra="forbid")

    expert_id: str
    name: str = ""
    kind: ExpertKind
    coefficient: float
    alpha: float | None = None  # Beta parameters when predicted by the VGAE
    beta: float | None = None
    mean: float | None = None
    std: float | None = None
    reason: str = ""
    path: str | None = None  # local weight file, resolved before merging
    sha256: str | None = None
    trigger_words: list[str] = Field(default_factory=list, max_length=16)  # added to the sampled prompt


class MergePlan(BaseModel):
    """Which base, checkpoint experts and LoRA experts to merge, and how.

    Checkpoint coefficients are in ``[0, 1]``: shares summing to 1 for ``fixed`` and ``similarity``, each
    expert's own task-vector scale for ``vgae`` (``planner.coefficients``); with ``weighted_average`` the base
    keeps ``1 - sum`` when the sum is below 1. LoRA coefficients are strengths in ``[0, lora_max_weight]``.
    """

    model_config = ConfigDict(extra="forbid")

    prompt: str = ""
    base_family: str = "sd15"
    base_model: str = ""  # path or identifier of the base weights; empty = settings.base_models[family]
    # how the planner chose the coefficients: vgae | fixed | similarity | direct | explicit (| base, eval names)
    coefficients: str = "vgae"
    merge_method: str = "task_arithmetic"  # how the merger combines checkpoints: weighted_average | ... | dare
    density: float = 0.5  # ties/dare keep-rate
    seed: int = 0
    checkpoints: list[PlannedExpert] = Field(default_factory=list)
    loras: list[PlannedExpert] = Field(default_factory=list)
    scheduler: str = Field(default="", max_length=64)  # diffusers class or A1111 name; "" = the base's own
    clip_skip: int | None = Field(default=None, ge=1, le=12)  # A1111 convention (1 = last layer)
    embeddings: list[PlannedExpert] = Field(default_factory=list)  # textual inversions (their token is prompted)
    notes: list[str] = Field(default_factory=list)
    timings: dict[str, float] = Field(default_factory=dict)

    @property
    def experts(self) -> list[PlannedExpert]:
        return [*self.checkpoints, *self.loras, *self.embeddings]

    @model_validator(mode="before")
    @classmethod
    def _old_method_key(cls, data: Any) -> Any:
        """Plans written before the rename call ``coefficients`` ``method``; both keys are read (and both are
        written, see :attr:`method`), so they must agree when both are given."""
        if isinstance(data, dict) and "method" in data:
            data = dict(data)
            old = data.pop("method")
            if data.setdefault("coefficients", old) != old:
                raise ValueError(f"method {old!r} and coefficients {data['coefficients']!r} disagree")
        return data

    @computed_field  # type: ignore[prop-decorator]
    @property
    def method(self) -> str:
        """Deprecated name of :attr:`coefficients`, still written to JSON for readers of the old key."""
        return self.coefficients


class GenerationStatus(StrEnum):
    pending = "PENDING"
    started = "STARTED"
    success = "SUCCESS"
    failure = "FAILURE"


class Generation(BaseModel):
    """A generation job and its outcome (the SQL record and the graph's :Generation node)."""

    model_config = ConfigDict(extra="forbid")

    id: str  # the Celery task id (or a uuid for in-process runs)
    prompt: str
    params: dict[str, Any] = Field(default_factory=dict)
    status: GenerationStatus = GenerationStatus.pending
    plan: MergePlan | None = None
    image_paths: list[str] = Field(default_factory=list)
    timings: dict[str, float] = Field(default_factory=dict)
    error: str | None = None
    created_at: datetime = Field(default_factory=utcnow)


class DiffGraphError(Exception):
    """Base class of errors that are shown to users as one clear line."""


class NotFoundError(DiffGraphError):
    pass


class ValidationFailed(DiffGraphError):
    pass
