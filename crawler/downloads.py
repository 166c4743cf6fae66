"""Downloads of expert weight files into the content store: resumable, hash-verified, size-capped, atomic.

Verified files live in ``core.content_store`` (``DIFFGRAPH_STORE_URL``, default the data dir) as
``blobs/sha256/<ab>/<sha256>.<ext>``; ``blobs/partial/<key>.part`` holds an interrupted download, resumed
with ``Range`` and locked while one process writes it.

Safety: only ``.safetensors`` files are accepted unless ``settings.allow_pickle`` (and then this module
still never unpickles anything: loading is ``merger.safe_load``'s job, with ``torch.load(weights_only=True)``).
A file whose bytes do not match the source's SHA-256, or whose safetensors header is inconsistent, is
deleted and never enters the store.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import requests
from filelock import FileLock, Timeout
from sqlalchemy import select

from core.content_store import ContentStore, sha256_of
from core.records import ExpertFileRecord, session_scope
from core.safetensors_header import HeaderError, read_header
from core.settings import Settings
from core.types import DiffGraphError, Expert, ExpertFile
from crawler.normalize.files import is_pickle
from crawler.retry_after import retry_after_seconds

log = logging.getLogger(__name__)

READ_CHUNK = 64 * 1024  # small reads: bytes received before a dropped connection are kept
ATTEMPTS = 5


class DownloadError(DiffGraphError):
    """A weight file could not be fetched or was rejected."""


class UnsafeFormat(DownloadError):
    """A pickle-based (or unknown) weight format while ``allow_pickle`` is off."""


class UnsafeSource(DownloadError):
    """A download URL that is not http(s) on a configured source host (``file://``, a bare path, ...)."""


class HashMismatch(DownloadError):
    """The downloaded bytes are not the file the source described."""


class CorruptWeights(DownloadError):
    """The file is not a consistent safetensors file."""


class TooLarge(DownloadError):
    """The file exceeds ``settings.max_download_bytes``."""


def validate_safetensors(path: Path) -> int:
    """Check a safetensors file's header before anything loads it (strictly: known dtypes, no overlapping
    tensors; see ``core.safetensors_header``); returns the number of tensors. Raises ``CorruptWeights``
    naming the first problem."""
    try:
        header, _ = read_header(path, strict=True)
    except HeaderError as exc:
        raise CorruptWeights(f"{path.name}: {exc}") from None
    return len(header)


def _ext(file: ExpertFile) -> str:
    suffix = Path(file.name).suffix.lower()
    return suffix if suffix and len(suffix) <= 16 else ".bin"


def source_hosts(settings: Settings) -> set[str]:
    """The hosts crawled experts may be downloaded from: those of the Civitai API and the Hub."""
    return {urlsplit(u).netloc.lower() for u in (settings.civitai_api_url, settings.hf_url)} - {""}


def check_source_url(settings: Settings, expert: Expert, file: ExpertFile) -> None:
    """Raise ``UnsafeSource`` unless ``file.url`` is http(s) on a source host. A URL comes from API data
    (untrusted): a ``file://`` URL or a bare path would copy any local file into the store, another host
    would receive the source's token. Local files enter only through ``import_file`` (``--from-file``)."""
    parts = urlsplit(file.url or "")
    if parts.scheme not in ("http", "https") or parts.netloc.lower() not in source_hosts(settings):
        shown = (file.url or "")[:200] or "an empty URL"
        raise UnsafeSource(
            f"expert {expert.id}: {file.name} URL {shown!r} is not http(s) on {', '.join(sorted(source_hosts(settings)))}; "
            f"refused (use `diffgraph download {expert.id} --from-file PATH` for a local copy)"
        )


class DownloadStore:
    """Fetches expert files into the content store (``core.content_store``)."""

    def __init__(self, settings: Settings, progress: bool = False, session: requests.Session | None = None) -> None:
        self.settings = settings
        self.store = ContentStore(settings)
        self._retry_after: float | None = None  # the last 429/5xx response's Retry-After
        self.progress = progress
        self.http = session or requests.Session()
        self.http.headers["User-Agent"] = settings.user_agent
        self._tokens = {
            urlsplit(settings.civitai_api_url).netloc: settings.civitai_token.get_secret_value(),
            urlsplit(settings.hf_url).netloc: settings.hf_token.get_secret_value(),
        }

    def fetch(self, expert: Expert, file: ExpertFile | None = None) -> Path:
        """The local path of ``file`` (default: the expert's primary file), downloading it if needed.

        Raises ``UnsafeFormat`` (pickle without ``allow_pickle``), ``UnsafeSource`` (not http(s) on a source
        host), ``TooLarge``, ``HashMismatch``, ``CorruptWeights`` or ``DownloadError`` (network/HTTP) with a
        message naming the expert.
        """
        file = self._admissible(expert, file)
        if file.sha256 and (stored := self.store.get_blob(file.sha256, _ext(file))) is not None:
            return stored
        check_source_url(self.settings, expert, file)
        key = file.sha256 or hashlib.sha256(file.url.encode()).hexdigest()
        part = self.store.partial_dir() / f"{key}.part"
        part.parent.mkdir(parents=True, exist_ok=True)
        with self._part_lock(part, file):
            if file.sha256 and (stored := self.store.get_blob(file.sha256, _ext(file))) is not None:
                return stored  # the process we waited for finished it
            try:
                self._download(expert, file, part, self.settings.max_download_bytes)
            except TooLarge:
                part.unlink(missing_ok=True)
                raise
            return self._admit(expert, file, part)

    @contextmanager
    def _part_lock(self, part: Path, file: ExpertFile) -> Iterator[None]:
        """Exclusive use of one ``.part`` file across processes (two workers fetching the same expert would
        interleave their bytes). An OS ``flock``: the kernel releases it when its holder dies, so a killed
        download never leaves a stale lock, and the next holder resumes its bytes."""
        lock = FileLock(f"{part}.lock")
        try:
            lock.acquire(timeout=0)
        except Timeout:
            log.info("waiting for another process downloading %s", file.name)
            lock.acquire()
        try:
            yield
        finally:
            lock.release()

    def import_file(self, expert: Expert, source: Path, file: ExpertFile | None = None) -> Path:
        """Admit a local copy of ``file`` (``diffgraph download ID --from-file PATH``): the same checks as a
        download, and the source must publish a SHA-256 that the copy matches."""
        file = self._admissible(expert, file)
        if not file.sha256:
            raise HashMismatch(f"expert {expert.id}: {file.name} has no published SHA-256 to check a local copy against")
        if not source.is_file():
            raise DownloadError(f"expert {expert.id}: {source} is not a file")
        if source.stat().st_size > self.settings.max_download_bytes:
            raise TooLarge(f"expert {expert.id}: {source} is over the {self.settings.max_download_bytes}-byte cap")
        # checked even when the store already holds the file: a wrong PATH is an error, never silently ignored
        part = self.store.partial_dir() / f"{file.sha256}.import.{os.getpid()}.part"
        part.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, part)
        return self._admit(expert, file, part)

    def _admissible(self, expert: Expert, file: ExpertFile | None) -> ExpertFile:
        """The file to fetch, after the checks that need no bytes (format policy, declared size)."""
        file = file or expert.primary_file
        if file is None:
            raise DownloadError(f"expert {expert.id} has no weight file to download")
        if not file.is_safetensors and not self.settings.allow_pickle:
            kind = "pickle-based" if is_pickle(file) else "non-safetensors"
            raise UnsafeFormat(
                f"expert {expert.id}: {file.name} is a {kind} file; refused (set DIFFGRAPH_ALLOW_PICKLE=1 to allow)"
            )
        cap = self.settings.max_download_bytes
        if file.size_bytes is not None and file.size_bytes > cap:
            raise TooLarge(f"expert {expert.id}: {file.name} is {file.size_bytes} bytes, over the {cap}-byte cap")
        return file

    def _admit(self, expert: Expert, file: ExpertFile, part: Path) -> Path:
        """Verify the complete bytes in ``part`` and move them into the store (or delete them)."""
        try:
            digest = sha256_of(part)
            if file.sha256 and digest != file.sha256:
                raise HashMismatch(
                    f"expert {expert.id}: {file.name} has SHA-256 {digest[:12]}…, the source says {file.sha256[:12]}…"
                )
            if file.is_safetensors:
                validate_safetensors(part)
        except (HashMismatch, CorruptWeights):
            part.unlink(missing_ok=True)  # never keep (or resume from) bytes we know are wrong
            raise
        return self.store.put_blob(part, digest, _ext(file))  # atomic: a complete, verified file or nothing

    # transfer ------------------------------------------------------------------------------------
    def _download(self, expert: Expert, file: ExpertFile, part: Path, cap: int) -> None:
        url = file.url
        if not url:
            raise DownloadError(f"expert {expert.id}: {file.name} has no download URL")
        last: Exception | None = None
        for attempt in range(ATTEMPTS):
            self._retry_after = None
            try:
                if self._transfer(expert, file, part, cap):
                    return
            except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError) as exc:
                last = exc
                log.info("download of %s interrupted at %d bytes (%s); resuming", file.name, _size(part), exc)
            time.sleep(retry_wait(attempt, self._retry_after, self.settings.crawl_retry_after_max_s))
        raise DownloadError(f"expert {expert.id}: download of {file.name} failed after {ATTEMPTS} attempts: {last}")

    def _transfer(self, expert: Expert, file: ExpertFile, part: Path, cap: int) -> bool:
        """One HTTP attempt; ``True`` when the file is complete."""
        have = _size(part)
        headers = {"Range": f"bytes={have}-"} if have else {}
        token = self._tokens.get(urlsplit(file.url).netloc)
        if token:
            headers["Authorization"] = f"Bearer {token}"
        with self.http.get(file.url, headers=headers, stream=True, timeout=(15, 120), allow_redirects=True) as resp:
            if resp.status_code == 416 and have:
                return True  # the part file already holds every byte
            if resp.status_code in (429, 500, 502, 503, 504):
                log.info("download of %s got HTTP %d; retrying", file.name, resp.status_code)
                self._retry_after = retry_after_seconds(resp.headers.get("Retry-After"))
                return False
            if resp.status_code not in (200, 206):
                raise DownloadError(f"expert {expert.id}: {file.name} download got HTTP {resp.status_code}")
            mode = "ab" if resp.status_code == 206 and have else "wb"
            written = have if mode == "ab" else 0
            expected = resp.headers.get("Content-Length")
            total = written + int(expected) if expected and expected.isdigit() else file.size_bytes
            if total is not None and total > cap:
                raise TooLarge(f"expert {expert.id}: {file.name} is {total} bytes, over the {cap}-byte cap")
            with part.open(mode) as out, self._bar(file.name, total, written) as advance:
                for block in resp.iter_content(READ_CHUNK):
                    written += len(block)
                    if written > cap:
                        raise TooLarge(f"expert {expert.id}: {file.name} exceeds the {cap}-byte cap")
                    out.write(block)
                    advance(len(block))
            if expected and expected.isdigit() and written - (have if mode == "ab" else 0) < int(expected):
                raise requests.exceptions.ChunkedEncodingError("connection closed before the end of the body")
            return True

    @contextmanager
    def _bar(self, name: str, total: int | None, done: int) -> Iterator[Any]:
        if not self.progress:
            yield lambda n: None
            return
        from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

        from core.cli import console

        with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                      console=console, transient=True) as bar:
            task = bar.add_task(name[:40], total=total, completed=done)
            yield lambda n: bar.advance(task, n)


def retry_wait(attempt: int, retry_after: float | None, retry_after_max: float) -> float:
    """Seconds before download attempt ``attempt + 1``: backoff, or the server's ``Retry-After`` when longer
    (capped by ``DIFFGRAPH_CRAWL_RETRY_AFTER_MAX_S``, as for the crawl)."""
    return max(min(8.0, 0.25 * 2**attempt), min(retry_after or 0.0, retry_after_max))


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _record(settings: Settings, expert: Expert, file: ExpertFile, status: str, path: Path | None,
            error: str | None) -> None:
    with session_scope(settings) as s:
        rec = s.scalars(
            select(ExpertFileRecord).where(ExpertFileRecord.expert_id == expert.id, ExpertFileRecord.name == file.name)
        ).first()
        if rec is None:
            rec = ExpertFileRecord(expert_id=expert.id, name=file.name)
            s.add(rec)
        rec.url, rec.sha256, rec.autov2, rec.size_bytes = file.url, file.sha256, file.autov2, file.size_bytes
        rec.format, rec.primary = file.format, file.primary
        rec.status, rec.local_path, rec.error = status, str(path) if path else None, error


def ensure_local(settings: Settings, expert: Expert | str, progress: bool = False,
                 from_file: Path | None = None) -> Path:
    """The verified local path of an expert's primary weight file (downloaded once, then reused).

    ``expert`` may be an id, looked up in the graph. ``from_file``: admit this local copy instead of
    downloading (it must match the published SHA-256). The outcome is recorded in ``ExpertFileRecord``
    (``downloaded`` | ``refused`` | ``failed``) and errors are re-raised as ``DownloadError`` subclasses.
    """
    if isinstance(expert, str):
        from graphdb.backends import store_session

        with store_session(settings) as store:
            expert = store.get_expert(expert)
    file = expert.primary_file
    if file is None:
        raise DownloadError(f"expert {expert.id} has no weight file to download")
    try:
        store = DownloadStore(settings, progress=progress)
        path = store.fetch(expert, file) if from_file is None else store.import_file(expert, Path(from_file), file)
    except (UnsafeFormat, UnsafeSource) as exc:
        _record(settings, expert, file, "refused", None, str(exc))
        raise
    except DownloadError as exc:
        _record(settings, expert, file, "failed", None, str(exc))
        raise
    _record(settings, expert, file, "downloaded", path, None)
    return path
