"""Where generated images go: a small ``Storage`` protocol and the local-disk implementation.

Keys are deterministic (``images/<job id>/<n>.png``) so a redelivered job overwrites its own images
instead of adding new ones. They live in the content store (``core.content_store``): on local disk
(``LocalStorage``, the default) or in a remote ``fsspec`` store (``StoreStorage``, ``s3://…`` URIs);
``get_storage`` is the one place that chooses.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Protocol, runtime_checkable

from PIL import Image

from core.content_store import ContentStore
from core.settings import Settings
from core.types import ValidationFailed

_JOB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,254}$")


def image_key(job_id: str, index: int) -> str:
    """The storage key of image ``index`` of job ``job_id`` (``images/<job id>/<n>.png``)."""
    if not _JOB_ID.fullmatch(job_id) or ".." in job_id:
        raise ValidationFailed(f"invalid job id {job_id!r}: letters, digits, '.', '_' and '-' only")
    if index < 0:
        raise ValidationFailed(f"image index must be >= 0, got {index}")
    return f"images/{job_id}/{index}.png"


@runtime_checkable
class Storage(Protocol):
    """Persists a job's images under deterministic keys."""

    def save_image(self, job_id: str, index: int, image: Image.Image) -> str:
        """Write (or overwrite) image ``index`` of ``job_id``; returns its path or URI."""

    def list_images(self, job_id: str) -> list[str]:
        """Paths or URIs of the job's stored images, by index."""

    def delete_job(self, job_id: str) -> None:
        """Remove every image of the job (no error if there is none)."""

    def uri(self, job_id: str, index: int) -> str:
        """Where image ``index`` of ``job_id`` is (or would be) stored."""


class LocalStorage:
    """Images as PNG files under ``<root>/images/<job id>/<n>.png``, written atomically."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root).resolve()

    def uri(self, job_id: str, index: int) -> str:
        return str(self.root / image_key(job_id, index))

    def save_image(self, job_id: str, index: int, image: Image.Image) -> str:
        path = Path(self.uri(job_id, index))
        path.parent.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        # Write then rename: a reader (or a worker killed mid-write) never sees a truncated PNG.
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(buf.getvalue())
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return str(path)

    def list_images(self, job_id: str) -> list[str]:
        folder = Path(self.uri(job_id, 0)).parent
        if not folder.is_dir():
            return []
        found = [p for p in folder.glob("*.png") if p.stem.isdigit()]
        return [str(p) for p in sorted(found, key=lambda p: int(p.stem))]

    def delete_job(self, job_id: str) -> None:
        folder = Path(self.uri(job_id, 0)).parent
        shutil.rmtree(folder, ignore_errors=True)


class StoreStorage:
    """Images in a remote content store (``DIFFGRAPH_STORE_URL`` such as ``s3://bucket/diffgraph``), so a
    job's images are readable from every machine; URIs are the store's URLs."""

    def __init__(self, store: ContentStore) -> None:
        self.store = store

    def uri(self, job_id: str, index: int) -> str:
        return self.store.uri(image_key(job_id, index))

    def save_image(self, job_id: str, index: int, image: Image.Image) -> str:
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        return self.store.write_bytes(image_key(job_id, index), buf.getvalue())

    def list_images(self, job_id: str) -> list[str]:
        prefix = image_key(job_id, 0).rsplit("/", 1)[0]
        found = [k for k in self.store.list_keys(prefix) if k.endswith(".png") and k[:-4].rsplit("/", 1)[-1].isdigit()]
        return [self.store.uri(k) for k in sorted(found, key=lambda k: int(k[:-4].rsplit("/", 1)[-1]))]

    def delete_job(self, job_id: str) -> None:
        self.store.delete_prefix(image_key(job_id, 0).rsplit("/", 1)[0])


def get_storage(settings: Settings) -> Storage:
    """The configured image storage: the content store (``DIFFGRAPH_STORE_URL``, default the data dir)."""
    store = ContentStore(settings)
    return LocalStorage(store.local_root) if store.is_local else StoreStorage(store)
