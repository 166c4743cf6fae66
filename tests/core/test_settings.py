from pathlib import Path

import pytest
from pydantic import ValidationError

from core.settings import Settings, get_settings


def test_defaults_are_offline_and_embedded(settings: Settings) -> None:
    assert settings.effective_graph_url.startswith("embedded://")
    assert settings.effective_graph_url.endswith("/var/graph")
    assert settings.effective_sql_url.startswith("sqlite:///")
    assert settings.civitai_api_url == "https://civitai.com/api/v1"
    assert settings.hf_url == "https://huggingface.co"
    assert not settings.llm_enabled and not settings.celery_enabled
    assert settings.allow_nsfw is False and settings.allow_pickle is False


@pytest.mark.parametrize(
    ("env", "field", "value"),
    [
        ("DIFFGRAPH_GRAPH_URL", "graph_url", "bolt://db:7687"),
        ("DIFFGRAPH_NEO4J_USER", "neo4j_user", "alice"),
        ("DIFFGRAPH_SQL_URL", "sql_url", "postgresql://u@h/db"),
        ("DIFFGRAPH_BROKER_URL", "broker_url", "redis://h:6379/0"),
        ("DIFFGRAPH_RESULT_URL", "result_url", "redis://h:6379/1"),
        ("DIFFGRAPH_CIVITAI_API_URL", "civitai_api_url", "http://127.0.0.1:9/api/v1"),
        ("DIFFGRAPH_HF_URL", "hf_url", "http://127.0.0.1:9"),
        ("DIFFGRAPH_LLM_BASE_URL", "llm_base_url", "http://127.0.0.1:9/v1"),
        ("DIFFGRAPH_LLM_MODEL", "llm_model", "m"),
        ("DIFFGRAPH_EMBEDDING_MODEL", "embedding_model", "/models/minilm"),
        ("DIFFGRAPH_EMBEDDING_PRECISION", "embedding_precision", "fp32"),
        ("DIFFGRAPH_DEVICE", "device", "cuda:1"),
    ],
)
def test_public_environment_names(settings: Settings, monkeypatch: pytest.MonkeyPatch, env: str, field: str, value: str) -> None:
    monkeypatch.setenv(env, value)
    assert getattr(Settings(), field) == value


def test_secrets_from_env_are_masked(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DIFFGRAPH_NEO4J_PASSWORD", "hunter2")
    monkeypatch.setenv("DIFFGRAPH_CIVITAI_TOKEN", "tok")
    monkeypatch.setenv("DIFFGRAPH_LLM_API_KEY", "sk-1")
    monkeypatch.setenv("DIFFGRAPH_BROKER_URL", "redis://:brokerpw@h:6379/0")
    monkeypatch.setenv("DIFFGRAPH_STORE_URL", "s3://key:storepw@bucket/diffgraph")
    s = Settings()
    assert s.neo4j_password.get_secret_value() == "hunter2"
    text = repr(s.masked())
    for secret in ("hunter2", "tok'", "sk-1", "brokerpw", "storepw"):
        assert secret not in text
    assert s.masked()["neo4j_password"] == "****"


def test_toml_file_and_env_precedence(settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "diffgraph.toml"
    cfg.write_text('llm_model = "from-toml"\nk_lora = 5\n[base_models]\nsd15 = "/models/sd15"\n')
    monkeypatch.setenv("DIFFGRAPH_CONFIG", str(cfg))
    s = Settings()
    assert (s.llm_model, s.k_lora, s.base_models) == ("from-toml", 5, {"sd15": "/models/sd15"})
    monkeypatch.setenv("DIFFGRAPH_K_LORA", "2")
    assert Settings().k_lora == 2


def test_bad_values_are_rejected(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DIFFGRAPH_DTYPE", "int3")
    with pytest.raises(ValidationError):
        Settings()


def test_get_settings_is_cached_until_cleared(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    first = get_settings()
    monkeypatch.setenv("DIFFGRAPH_LLM_MODEL", "changed")
    assert get_settings() is first
    get_settings.cache_clear()
    assert get_settings().llm_model == "changed"
