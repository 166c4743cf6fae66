"""The merge cache (``<data_dir>/cache/merges``): merged checkpoints by recipe hash, bounded in size.

An SD1.5 merge is about 2 GB, so the cache keeps at most ``DIFFGRAPH_MERGE_CACHE_BYTES`` (default
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
import time
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

SUFFIX = ".safetensors"
STALE_PARTIAL_S = 600.0  # a writer appends continuously; a partial file untouched this long is orphaned


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

    def path(self, key: str) -> Path:
        return self.root / f"{key}{SUFFIX}"

    def get_or_build(self, key: str, build: Callable[[Path], Path]) -> Path:
        """The cached merge ``key``, built with ``build(out)`` by exactly one process if missing."""
        from filelock import FileLock

        out = self.path(key)
        if out.is_file():
            touch(out)
            return out
        self.root.mkdir(parents=True, exist_ok=True)
        with FileLock(self.root / f".{key}.lock"):
            if not out.is_file():  # nobody built it while this process waited for the lock
                for partial in self.root.glob(f".{out.name}.partial-*"):  # a dead builder's leftovers
                    partial.unlink(missing_ok=True)
                build(out)
        touch(out)
        self.evict(keep=out)
        return out

    def entries(self) -> list[tuple[float, int, Path]]:
        """(last use, size, path) of every complete merge, least recently used first."""
        out = []
        for p in self.root.glob(f"*{SUFFIX}"):
            try:
                st = p.stat()
            except FileNotFoundError:
                continue
            out.append((st.st_atime, st.st_size, p))
        return sorted(out)

    def evict(self, keep: Path | None = None) -> list[Path]:
        """Remove least recently used merges until the cache fits ``max_bytes`` (``keep`` stays), and
        orphaned partial files; returns the merges removed."""
        from filelock import FileLock

        removed: list[Path] = []
        with FileLock(self.root / ".evict.lock"):
            now = time.time()
            for partial in self.root.glob(f".*{SUFFIX}.partial-*"):
                try:
                    if now - partial.stat().st_mtime >= STALE_PARTIAL_S:
                        partial.unlink(missing_ok=True)
                except FileNotFoundError:
                    pass
            entries = self.entries()
            total = sum(size for _, size, _ in entries)
            for _, size, path in entries:
                if total <= self.max_bytes:
                    break
                if keep is not None and path == keep:
                    continue
                path.unlink(missing_ok=True)
                total -= size
                removed.append(path)
        if removed:
            log.info("merge cache: evicted %d merge(s) to stay under %d bytes", len(removed), self.max_bytes)
        return removed
