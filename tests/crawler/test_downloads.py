"""The content-addressed download store against the local Civitai fixture server."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import pytest
from sqlalchemy import select

from core.records import ExpertFileRecord, session_scope
from core.types import Expert, ExpertFile, ExpertKind
from crawler.downloads import (
    CorruptWeights,
    DownloadStore,
    HashMismatch,
    TooLarge,
    UnsafeFormat,
    UnsafeSource,
    ensure_local,
    retry_wait,
    validate_safetensors,
)
from tests.fakes.servers import CivitaiFixtureServer


def _expert(url: str, name: str, sha: str | None, size: int | None = None, fmt: str = "SafeTensor") -> Expert:
    return Expert(id=f"civitai:{abs(hash(name)) % 10**6}", source="civitai", name=name, kind=ExpertKind.lora,
                  files=[ExpertFile(name=name, url=url, sha256=sha, size_bytes=size, format=fmt)])


def _record(settings, expert_id: str) -> ExpertFileRecord:
    with session_scope(settings) as s:
        return s.scalars(select(ExpertFileRecord).where(ExpertFileRecord.expert_id == expert_id)).one()


def _for(settings, server):
    """Settings whose Civitai source is the fixture server (downloads are allowed from its host only)."""
    return settings.model_copy(update={"civitai_api_url": server.api_url})


def _blobs(settings) -> list[Path]:
    root = Path(settings.data_dir) / "blobs"  # blobs and resumable partials (lock files hold no bytes)
    return [p for p in root.rglob("*") if p.is_file() and p.suffix != ".lock"] if root.exists() else []


def test_download_is_content_addressed_and_recorded(settings, weights) -> None:
    path = weights("style.safetensors", seed=1)
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    with CivitaiFixtureServer([], files={path.name: path}) as server:
        settings = _for(settings, server)
        expert = _expert(server.file_url(path.name), path.name, sha, path.stat().st_size)
        local = ensure_local(settings, expert)
        assert local == Path(settings.data_dir) / "blobs" / "sha256" / sha[:2] / f"{sha}.safetensors"
        assert local.read_bytes() == path.read_bytes()
        again = ensure_local(settings, expert)  # reused, not fetched again
        assert again == local and server.count(path.name) == 1
    rec = _record(settings, expert.id)
    assert (rec.status, rec.local_path, rec.sha256) == ("downloaded", str(local), sha)


def test_hash_mismatch_is_rejected_and_not_stored(settings, weights) -> None:
    path = weights("liar.safetensors", seed=2)
    with CivitaiFixtureServer([], files={path.name: path}) as server:
        settings = _for(settings, server)
        expert = _expert(server.file_url(path.name), path.name, "0" * 64)
        with pytest.raises(HashMismatch, match=expert.id):
            ensure_local(settings, expert)
    assert _blobs(settings) == []  # neither a stored blob nor a resumable partial
    assert _record(settings, expert.id).status == "failed"


def test_pickle_only_file_is_refused_without_a_request(settings, tmp_path) -> None:
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"\x80\x04not really a pickle")
    with CivitaiFixtureServer([], files={ckpt.name: ckpt}) as server:
        settings = _for(settings, server)
        expert = _expert(server.file_url(ckpt.name), ckpt.name, None, fmt="PickleTensor")
        with pytest.raises(UnsafeFormat, match="refused"):
            ensure_local(settings, expert)
        assert server.requests == []
    assert _record(settings, expert.id).status == "refused"


def test_pickle_allowed_only_by_opt_in(settings, tmp_path) -> None:
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"opaque bytes")
    sha = hashlib.sha256(ckpt.read_bytes()).hexdigest()
    with CivitaiFixtureServer([], files={ckpt.name: ckpt}) as server:
        settings = _for(settings, server)
        expert = _expert(server.file_url(ckpt.name), ckpt.name, sha, fmt="PickleTensor")
        opted = settings.model_copy(update={"allow_pickle": True})
        assert DownloadStore(opted).fetch(expert).suffix == ".ckpt"


def test_interrupted_download_is_resumed(settings, tmp_path) -> None:
    big = tmp_path / "big.safetensors"
    header = json.dumps({"w": {"dtype": "U8", "shape": [300_000], "data_offsets": [0, 300_000]}}).encode()
    big.write_bytes(struct.pack("<Q", len(header)) + header + bytes(range(256)) * 1171 + bytes(300_000 - 256 * 1171))
    sha = hashlib.sha256(big.read_bytes()).hexdigest()
    with CivitaiFixtureServer([], files={big.name: big}) as server:
        settings = _for(settings, server)
        server.drop_download(big.name, times=1)
        expert = _expert(server.file_url(big.name), big.name, sha)
        local = DownloadStore(settings).fetch(expert)
        assert local.read_bytes() == big.read_bytes()
        assert len(server.range_requests) == 1
        resumed_from = int(server.range_requests[0][1].split("=")[1].rstrip("-"))
        assert 0 < resumed_from < big.stat().st_size


def test_size_cap(settings, weights) -> None:
    path = weights("capped.safetensors", seed=3)
    with CivitaiFixtureServer([], files={path.name: path}) as server:
        small = _for(settings, server).model_copy(update={"max_download_bytes": 100})
        declared = _expert(server.file_url(path.name), path.name, None, size=10_000)
        with pytest.raises(TooLarge):
            DownloadStore(small).fetch(declared)
        assert server.requests == []
        undeclared = _expert(server.file_url(path.name), path.name, None)
        with pytest.raises(TooLarge):
            DownloadStore(small).fetch(undeclared)
    assert _blobs(settings) == []


def test_corrupt_safetensors_header_is_rejected(settings, tmp_path) -> None:
    bad = tmp_path / "bad.safetensors"
    header = json.dumps({"w": {"dtype": "F32", "shape": [1000], "data_offsets": [0, 4000]}}).encode()
    bad.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 16)  # offsets past the end
    sha = hashlib.sha256(bad.read_bytes()).hexdigest()
    with CivitaiFixtureServer([], files={bad.name: bad}) as server:
        settings = _for(settings, server)
        with pytest.raises(CorruptWeights, match="offsets"):
            DownloadStore(settings).fetch(_expert(server.file_url(bad.name), bad.name, sha))
    assert _blobs(settings) == []


@pytest.mark.parametrize(
    ("tensors", "message"),
    [
        ({"w": {"dtype": "X9", "shape": [1], "data_offsets": [0, 1]}}, "dtype"),
        ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, "size"),
        ({"a": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]},
          "b": {"dtype": "U8", "shape": [4], "data_offsets": [2, 6]}}, "overlap"),
    ],
)
def test_validate_safetensors_rejects(tmp_path, tensors, message) -> None:
    header = json.dumps(tensors).encode()
    path = tmp_path / "t.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 8)
    with pytest.raises(CorruptWeights, match=message):
        validate_safetensors(path)


def test_validate_real_safetensors(weights) -> None:
    assert validate_safetensors(weights("ok.safetensors")) == 2


@pytest.mark.parametrize("kind", ["file_url", "bare_path", "other_scheme", "other_host"])
def test_download_urls_outside_the_source_hosts_are_refused(settings, weights, kind) -> None:
    local = weights("secret.safetensors", seed=4)
    sha = hashlib.sha256(local.read_bytes()).hexdigest()
    with CivitaiFixtureServer([], files={local.name: local}) as server:
        url = {"file_url": local.resolve().as_uri(), "bare_path": str(local.resolve()),
               "other_scheme": f"ftp://127.0.0.1/{local.name}",
               "other_host": server.file_url(local.name)}[kind]  # settings still name civitai.com
        expert = _expert(url, local.name, sha)
        with pytest.raises(UnsafeSource, match="refused") as err:
            ensure_local(settings, expert)
        assert "\n" not in str(err.value)
        assert server.requests == []
    assert _blobs(settings) == []
    assert _record(settings, expert.id).status == "refused"


def test_local_copy_enters_only_explicitly_and_is_checked(settings, weights) -> None:
    local = weights("mine.safetensors", seed=5)
    sha = hashlib.sha256(local.read_bytes()).hexdigest()
    expert = _expert("https://civitai.com/api/download/models/1", local.name, sha)
    stored = ensure_local(settings, expert, from_file=local)
    assert stored.read_bytes() == local.read_bytes() and stored != local
    assert ensure_local(settings, expert) == stored  # known by its hash: nothing to fetch
    other = weights("other.safetensors", seed=6)
    with pytest.raises(HashMismatch):  # a wrong copy is refused even though the store holds the file
        ensure_local(settings, expert, from_file=other)
    liar = _expert("https://civitai.com/api/download/models/2", "liar.safetensors", sha[::-1])
    with pytest.raises(HashMismatch):
        ensure_local(settings, liar, from_file=other)
    unpublished = _expert("https://civitai.com/api/download/models/3", "np.safetensors", None)
    with pytest.raises(HashMismatch, match="no published SHA-256"):
        ensure_local(settings, unpublished, from_file=other)


def test_download_retries_wait_for_retry_after_within_the_cap(settings, weights) -> None:
    assert retry_wait(0, 30.0, 300.0) == 30.0  # the server asked for longer than the backoff
    assert retry_wait(0, 86_400.0, 300.0) == 300.0  # a hostile day is capped
    assert retry_wait(3, None, 300.0) == 2.0  # no header: exponential backoff
    path = weights("busy.safetensors", seed=7)
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    with CivitaiFixtureServer([], files={path.name: path}) as server:
        server.fail(path.name, ("status", 429, 0))
        local = DownloadStore(_for(settings, server)).fetch(_expert(server.file_url(path.name), path.name, sha))
        assert local.read_bytes() == path.read_bytes() and server.count(path.name) == 2
