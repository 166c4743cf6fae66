"""Shipped files are checked against the SHA-256 recorded in ``world.json`` before first use."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

from core.content_store import sha256_of
from core.types import DiffGraphError
from world import paths


class WorldError(DiffGraphError):
    """The shipped world is missing or damaged (the message names the file)."""


sha256 = sha256_of  # the one file hasher (core.content_store)


def manifest() -> dict:
    path = paths.manifest_path()
    if not path.is_file():
        raise WorldError(f"world manifest missing: {path} (run `diffgraph world build`)")
    try:
        return json.loads(path.read_text())
    except ValueError:
        raise WorldError(f"world manifest is not valid JSON: {path}") from None


@cache
def _verified(path: str, size: int, mtime: float) -> None:
    p = Path(path)
    rel = p.relative_to(paths.shipped_dir()).as_posix()
    expected = manifest().get("files", {}).get(rel)
    if expected is None:
        raise WorldError(f"world file not listed in world.json: {rel}")
    if sha256(p) != expected:
        raise WorldError(f"world file is corrupted (SHA-256 mismatch): {p}")


def verified(path: Path) -> Path:
    """``path`` after checking that it exists and matches its recorded SHA-256 (once per file version)."""
    path = Path(path).resolve()
    if not path.is_file():
        raise WorldError(f"world file missing: {path}")
    st = path.stat()
    _verified(str(path), st.st_size, st.st_mtime)
    return path


def verify_all() -> list[str]:
    """Check every file world.json lists; returns the relative paths checked."""
    files = manifest().get("files", {})
    for rel in files:
        verified(paths.shipped_dir() / rel)
    return list(files)
