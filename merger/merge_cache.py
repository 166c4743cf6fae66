"""The merge cache (``<data_dir>/cache/merges``): merged checkpoints by recipe hash, bounded in size.

An SD1.5 merge is one file of about 2 GB; an SDXL/FLUX merge of a diffusers base is a directory whose
unchanged components are symlinks to the base (only its own files count toward the bound). An SD1.5 merge is about 2 GB, so the cache keeps at most ``DIFFGRAPH_MERGE_CACHE_BYTES`` (default
20 GiB) and evicts the least recently used merges first; each use stamps the file's access time itself
(``os.utime``), since file systems mounted ``noatime``/``relatime`` do not.

Several processes (workers on one machine, or on several sharing the directory) may use it at once:

* a merge is built under a per-key ``filelock``, so two processes asking for the same merge build it
  once; the second waits and reuses the file;
* the writer publishes the file atomically (``StreamingSafetensorsWriter``), so a reader never sees half
  a merge; partial files left by a dead process are removed (those of the key being built under its lock,
  others once no process has written to them for ``STALE_PARTIAL_S``);
* eviction runs under one cache-wide lock and never removes the merge just returned.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

SUFFIX = ".safetensors"
STALE_PARTIAL_S = 600.0  # a writer appends continuously; a partial file untouched this long is orphaned


def _size(path: Path) -> int:
    """Bytes an entry holds: a file's size, or a directory's own files (symlinks to the base not counted)."""
    if not path.is_dir():
        return path.stat().st_size
    return sum(p.lstat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def touch(path: Path) -> None:
    """Record a use of ``path`` (its access time) for least-recently-used eviction."""
    try:
        os.utime(path, (time.time(), path.stat().st_mtime))
    except FileNotFoundError:
        pass


class MergeCache:
    def __init__(self, root: Path, max_bytes: int) -> None:
        self.root = Path(root)
        self.max_bytes = int(max_bytes)

    def path(self, key: str, directory: bool = False) -> Path:
        return self.root / (key if directory else f"{key}{SUFFIX}")

    def get_or_build(self, key: str, build: Callable[[Path], Path], directory: bool = False) -> Path:
        """The cached merge ``key`` (a file, or a diffusers ``directory``), built with ``build(out)`` by
        exactly one process if missing."""
        from filelock import FileLock

        out = self.path(key, directory)
        if out.exists():
            touch(out)
            return out
        self.root.mkdir(parents=True, exist_ok=True)
        with FileLock(self.root / f".{key}.lock"):
            if not out.exists():  # nobody built it while this process waited for the lock
                for partial in self.root.glob(f".{out.name}.partial-*"):  # a dead builder's leftovers
                    _remove(partial)
                build(out)
        touch(out)
        self.evict(keep=out)
        return out

    def entries(self) -> list[tuple[float, int, Path]]:
        """(last use, size, path) of every complete merge, least recently used first."""
        out = []
        for p in self.root.iterdir() if self.root.is_dir() else []:
            if p.name.startswith(".") or not (p.is_dir() or p.name.endswith(SUFFIX)):
                continue  # locks and partial writes
            try:
                out.append((p.stat().st_atime, _size(p), p))
            except FileNotFoundError:
                continue
        return sorted(out)

    def evict(self, keep: Path | None = None) -> list[Path]:
        """Remove least recently used merges until the cache fits ``max_bytes`` (``keep`` stays), and
        orphaned partial files; returns the merges removed."""
        from filelock import FileLock

        removed: list[Path] = []
        with FileLock(self.root / ".evict.lock"):
            now = time.time()
            for partial in self.root.glob(".*.partial-*"):
                try:
                    if now - partial.stat().st_mtime >= STALE_PARTIAL_S:
                        _remove(partial)
                except FileNotFoundError:
                    pass
            entries = self.entries()
            total = sum(size for _, size, _ in entries)
            for _, size, path in entries:
                if total <= self.max_bytes:
                    break
                if keep is not None and path == keep:
                    continue
                _remove(path)
                total -= size
                removed.append(path)
        if removed:
            log.info("merge cache: evicted %d merge(s) to stay under %d bytes", len(removed), self.max_bytes)
        return removed
