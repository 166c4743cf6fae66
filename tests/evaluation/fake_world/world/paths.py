from pathlib import Path


def base_model_path() -> Path:
    return Path(__file__).parent
