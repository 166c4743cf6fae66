"""The content store (``DIFFGRAPH_STORE_URL``): workers with their own data dirs share weights and images;
copies read from a remote store are re-verified and repaired."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import uuid
from pathlib import Path

import fsspec
import pytest
from PIL import Image

from core.content_store import ContentStore, blob_key
from core.types import Expert, ExpertFile, ExpertKind
from crawler.downloads import DownloadStore
from deploy.storage import get_storage
from tests.fakes.servers import CivitaiFixtureServer

from .test_download_lock import CHILD

ROOT = Path(__file__).resolve().parents[2]


def _expert(url: str, path: Path) -> Expert:
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    return Expert(id="civitai:88", source="civitai", name="shared", kind=ExpertKind.lora,
                  files=[ExpertFile(name=path.name, url=url, sha256=sha, size_bytes=path.stat().st_size)])


@pytest.mark.parametrize("as_url", [False, True], ids=["path", "file-url"])
def test_two_workers_with_their_own_data_dirs_share_one_store(settings, weights, tmp_path, as_url) -> None:
    path = weights("shared.safetensors", seed=21)
    shared = tmp_path / "shared-store"
    store_url = shared.as_uri() if as_url else str(shared)
    with CivitaiFixtureServer([], files={path.name: path}) as server:
        expert = _expert(server.file_url(path.name), path)
        outputs = []
        for worker in ("gpu-a", "gpu-b"):  # two machines: different data dirs, one shared store
            env = {**os.environ, "PYTHONPATH": str(ROOT), "DIFFGRAPH_CIVITAI_API_URL": server.api_url,
                   "DIFFGRAPH_DATA_DIR": str(tmp_path / worker), "DIFFGRAPH_STORE_URL": store_url}
            proc = subprocess.run([sys.executable, "-c", CHILD, expert.model_dump_json()], cwd=ROOT, env=env,
                                  capture_output=True, text=True, timeout=120, check=False)
            assert proc.returncode == 0, proc.stderr[-2000:]
            outputs.append(Path(proc.stdout.strip()))
        assert server.count(path.name) == 1  # the second worker found the verified blob in the store
    assert outputs[0] == outputs[1] == shared / blob_key(expert.files[0].sha256, ".safetensors")
    assert outputs[0].read_bytes() == path.read_bytes()

    # images written by one worker are listed by the other
    a, b = (settings.model_copy(update={"data_dir": tmp_path / w, "store_url": store_url}) for w in ("gpu-a", "gpu-b"))
    get_storage(a).save_image("job-1", 0, Image.new("RGB", (4, 4), "red"))
    assert [Path(u) for u in get_storage(b).list_images("job-1")] == [shared / "images" / "job-1" / "0.png"]


def test_remote_store_copies_are_verified_and_repaired(settings, weights, tmp_path) -> None:
    path = weights("remote.safetensors", seed=22)
    store_url = f"memory://diffgraph-{uuid.uuid4().hex}"  # stands in for s3://bucket/prefix
    with CivitaiFixtureServer([], files={path.name: path}) as server:
        expert = _expert(server.file_url(path.name), path)

        def worker(name: str) -> Path:
            cfg = settings.model_copy(update={"data_dir": tmp_path / name, "store_url": store_url,
                                              "civitai_api_url": server.api_url})
            return DownloadStore(cfg).fetch(expert)

        first = worker("a")
        key = blob_key(expert.files[0].sha256, ".safetensors")
        fs, root = fsspec.core.url_to_fs(store_url)
        assert fs.cat_file(f"{root}/{key}") == path.read_bytes()  # uploaded to the store
        second = worker("b")
        assert server.count(path.name) == 1 and second != first and second.read_bytes() == path.read_bytes()

        fs.pipe_file(f"{root}/{key}", b"bit rot" + path.read_bytes()[7:])  # the remote copy gets damaged
        third = worker("c")
        assert third.read_bytes() == path.read_bytes()  # never the damaged bytes
        assert server.count(path.name) == 2  # fetched again from the source...
        assert fs.cat_file(f"{root}/{key}") == path.read_bytes()  # ...and the store repaired

    cfg = settings.model_copy(update={"store_url": store_url})
    uri = get_storage(cfg).save_image("job-r", 0, Image.new("RGB", (4, 4), "blue"))
    assert uri.startswith("memory://") and get_storage(cfg).list_images("job-r") == [uri]
    assert ContentStore(cfg).is_local is False
