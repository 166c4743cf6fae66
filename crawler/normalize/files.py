"""Weight files: formats, hashes and the primary file (SafeTensor preferred)."""

from __future__ import annotations

import re

from core.types import ExpertFile
from crawler.normalize.text import clean_line

MAX_FILES = 32
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")
WEIGHT_SUFFIXES = (".safetensors", *PICKLE_SUFFIXES)
_SHA256 = re.compile(r"^[0-9a-fA-F]{64}$")
_AUTOV2 = re.compile(r"^[0-9a-fA-F]{10,12}$")
# Civitai file ``type`` values that are the expert itself (not VAE, config, training data...).
_MODEL_TYPES = {"model", "pruned model", ""}


def normalize_sha256(value: object) -> str | None:
    """A lower-case hex SHA-256, or ``None`` when absent/malformed."""
    return value.lower() if isinstance(value, str) and _SHA256.match(value) else None


def normalize_format(name: str, declared: object = None) -> str:
    """``SafeTensor`` | ``PickleTensor`` | ``Other``; the file name wins over a contradicting declaration."""
    lower = name.lower()
    if lower.endswith(".safetensors"):
        return "SafeTensor"
    if lower.endswith(PICKLE_SUFFIXES):
        return "PickleTensor"
    if isinstance(declared, str) and declared in {"SafeTensor", "PickleTensor"}:
        return declared
    return "Other"


def is_pickle(file: ExpertFile) -> bool:
    return file.format == "PickleTensor" or file.name.lower().endswith(PICKLE_SUFFIXES)


def select_primary(files: list[ExpertFile]) -> list[ExpertFile]:
    """Mark exactly one primary file: a SafeTensor the source marks primary, else any SafeTensor, else the
    source's primary, else the first. Returns new objects; the input is not changed."""
    if not files:
        return []
    safes = [f for f in files if f.format == "SafeTensor"]
    if safes:
        chosen = next((f for f in safes if f.primary), safes[0])
    else:
        chosen = next((f for f in files if f.primary), files[0])
    return [f.model_copy(update={"primary": f is chosen}) for f in files]


def normalize_civitai_files(raw: object) -> tuple[list[ExpertFile], int]:
    """Expert files of a Civitai version and the number of malformed entries skipped."""
    if not isinstance(raw, list):
        return [], 0
    files: list[ExpertFile] = []
    bad = 0
    for entry in raw[: MAX_FILES * 2]:
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            bad += 1
            continue
        if str(entry.get("type") or "").lower() not in _MODEL_TYPES:
            continue
        name = clean_line(entry["name"], 512)
        if any(f.name == name for f in files):  # one record per file name (the SQL key is expert+name)
            continue
        hashes = entry.get("hashes") if isinstance(entry.get("hashes"), dict) else {}
        meta = entry.get("metadata") if isinstance(entry.get("metadata"), dict) else {}
        size_kb = entry.get("sizeKB")
        size = int(float(size_kb) * 1024) if isinstance(size_kb, int | float) and size_kb >= 0 else None
        autov2 = hashes.get("AutoV2")
        files.append(
            ExpertFile(
                name=name,
                url=str(entry.get("downloadUrl") or "")[:4096],
                sha256=normalize_sha256(hashes.get("SHA256")),
                autov2=autov2.upper() if isinstance(autov2, str) and _AUTOV2.match(autov2) else None,
                size_bytes=size,
                format=normalize_format(name, meta.get("format")),
                primary=bool(entry.get("primary")),
                pickle_scan=clean_line(entry.get("pickleScanResult") or "", 64) or None,
                virus_scan=clean_line(entry.get("virusScanResult") or "", 64) or None,
            )
        )
        if len(files) >= MAX_FILES:
            break
    return select_primary(files), bad


def normalize_hf_files(siblings: object, base_url: str, repo_id: str, revision: str) -> list[ExpertFile]:
    """Root-level weight files of a Hub repo (``siblings`` with ``lfs`` metadata from ``?blobs=true``).

    ``pytorch_lora_weights.safetensors`` (the diffusers LoRA name) is preferred as primary.
    """
    if not isinstance(siblings, list):
        return []
    files: list[ExpertFile] = []
    for s in siblings:
        name = s.get("rfilename") if isinstance(s, dict) else None
        if not isinstance(name, str) or "/" in name or not name.lower().endswith(WEIGHT_SUFFIXES):
            continue
        if any(f.name == name for f in files):
            continue
        lfs = s.get("lfs") if isinstance(s.get("lfs"), dict) else {}
        size = lfs.get("size", s.get("size"))
        files.append(
            ExpertFile(
                name=clean_line(name, 512),
                url=f"{base_url.rstrip('/')}/{repo_id}/resolve/{revision}/{name}",
                sha256=normalize_sha256(lfs.get("sha256")),
                size_bytes=size if isinstance(size, int) and size >= 0 else None,
                format=normalize_format(name),
                primary=name == "pytorch_lora_weights.safetensors",
            )
        )
        if len(files) >= MAX_FILES:
            break
    return select_primary(files)
