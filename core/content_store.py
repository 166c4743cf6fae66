"""The content store: verified weight files (by SHA-256) and generated images, shared by every worker.

``DIFFGRAPH_STORE_URL`` is any ``fsspec`` URL: empty means the data dir; a directory (a path or a
``file://`` URL, e.g. a shared mount) is used in place; a remote store (``s3://bucket/diffgraph`` with
``s3fs`` installed, ``gs://``, ``memory://`` in tests) is read through a local cache under the data dir.

Layout under the store's root: ``blobs/sha256/<ab>/<sha256>.<ext>`` (complete, verified files only),
``blobs/partial/`` (downloads in progress; local stores only) and ``images/<job id>/<n>.png``.

Remote bytes are not trusted: every blob copied from a remote store is checked against its SHA-256
before use, and a damaged copy is deleted there so that the caller fetches it again from its source
(which repairs the store).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from core.settings import Settings

log = logging.getLogger(__name__)
CHUNK = 1 << 20


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def blob_key(sha256: str, ext: str) -> str:
    return f"blobs/sha256/{sha256[:2]}/{sha256}{ext}"


class ContentStore:
    """One store at ``settings.store_url`` (default: the data dir)."""

    def __init__(self, settings: Settings) -> None:
        self.url = settings.store_url or str(settings.data_dir)
        self.fs: Any
        self.fs, root = fsspec.core.url_to_fs(self.url)
        self.root = root.rstrip("/") or "/"
        self.is_local = isinstance(self.fs, LocalFileSystem)
        # where blobs are read from: the store itself, or this worker's cache of a remote store
        self.local_root = Path(self.root) if self.is_local else Path(settings.data_dir) / "store-cache"

    def remote_path(self, key: str) -> str:
        return f"{self.root}/{key}"

    def uri(self, key: str) -> str:
        """Where ``key`` is, as a path (local store) or a URL (remote store)."""
        return str(self.local_root / key) if self.is_local else self.fs.unstrip_protocol(self.remote_path(key))

    # weights -------------------------------------------------------------------------------------
    def partial_dir(self) -> Path:
        """Where downloads in progress live (in a shared directory store, so its workers share the locks)."""
        return self.local_root / "blobs" / "partial"

    def get_blob(self, sha256: str, ext: str) -> Path | None:
        """A local path of the verified blob, or ``None`` when the store does not hold it (or held a damaged
        remote copy, now deleted: the caller fetches it again and ``put_blob`` repairs the store)."""
        key = blob_key(sha256, ext)
        local = self.local_root / key
        if local.is_file():
            return local
        if self.is_local or not self.fs.exists(self.remote_path(key)):
            return None
        local.parent.mkdir(parents=True, exist_ok=True)
        tmp = local.with_name(f".{local.name}.{uuid.uuid4().hex}.tmp")
        try:
            self.fs.get_file(self.remote_path(key), str(tmp))
            digest = sha256_of(tmp)
            if digest != sha256:
                log.warning("store copy of %s is damaged (SHA-256 %s…); deleting it to fetch it again",
                            key, digest[:12])
                self.fs.rm_file(self.remote_path(key))
                return None
            os.replace(tmp, local)
        finally:
            tmp.unlink(missing_ok=True)
        return local

    def put_blob(self, path: Path, sha256: str, ext: str) -> Path:
        """Move the verified file ``path`` into the store; returns the local path to read it from."""
        key = blob_key(sha256, ext)
        local = self.local_root / key
        local.parent.mkdir(parents=True, exist_ok=True)
        if not self.is_local:
            tmp_remote = self.remote_path(f"{key}.{uuid.uuid4().hex}.tmp")
            self.fs.put_file(str(path), tmp_remote)
            self.fs.mv(tmp_remote, self.remote_path(key))  # readers see the whole blob or none
        _move_into(path, local)
        return local

    # images --------------------------------------------------------------------------------------
    def write_bytes(self, key: str, data: bytes) -> str:
        """Write (or overwrite) ``key`` atomically; returns its ``uri``."""
        if self.is_local:
            path = self.local_root / key
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
            try:
                with tmp.open("wb") as fh:
                    fh.write(data)
                    fh.flush()
                    os.fsync(fh.fileno())
                os.replace(tmp, path)
            finally:
                tmp.unlink(missing_ok=True)
        else:
            self.fs.pipe_file(self.remote_path(key), data)  # one object: written whole or not at all
        return self.uri(key)

    def list_keys(self, prefix: str) -> list[str]:
        """Keys of the files directly under ``prefix``."""
        base = self.remote_path(prefix.rstrip("/"))
        if not self.fs.isdir(base):
            return []
        names = self.fs.ls(base, detail=False)
        return [f"{prefix.rstrip('/')}/{str(n).rstrip('/').rsplit('/', 1)[-1]}" for n in names]

    def delete_prefix(self, prefix: str) -> None:
        base = self.remote_path(prefix.rstrip("/"))
        if self.fs.exists(base):
            self.fs.rm(base, recursive=True)


def _move_into(src: Path, dest: Path) -> None:
    """Atomically place ``src`` at ``dest``, also across filesystems (a store on a shared mount)."""
    try:
        os.replace(src, dest)
        return
    except OSError:
        pass
    tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex}.tmp")
    try:
        shutil.copyfile(src, tmp)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    src.unlink(missing_ok=True)


def get_content_store(settings: Settings) -> ContentStore:
    return ContentStore(settings)
