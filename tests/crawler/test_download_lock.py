"""Two processes downloading the same file: one ``.part`` file, locked; a killed holder releases it."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from core.types import Expert, ExpertFile, ExpertKind
from crawler.downloads import DownloadStore
from tests.fakes.servers import CivitaiFixtureServer

ROOT = Path(__file__).resolve().parents[2]
CHILD = """
import json, logging, sys
from core.settings import Settings
from core.types import Expert
from crawler.downloads import DownloadStore
logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
print(DownloadStore(Settings()).fetch(Expert.model_validate_json(sys.argv[1])), flush=True)
"""


def _big_file(path: Path, n: int = 2_000_000) -> Path:
    header = json.dumps({"w": {"dtype": "U8", "shape": [n], "data_offsets": [0, n]}}).encode()
    path.write_bytes(len(header).to_bytes(8, "little") + header + os.urandom(n))
    return path


def _expert(url: str, path: Path) -> Expert:
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    return Expert(id="civitai:77", source="civitai", name="big", kind=ExpertKind.lora,
                  files=[ExpertFile(name=path.name, url=url, sha256=sha, size_bytes=path.stat().st_size)])


def _start(expert: Expert, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", CHILD, expert.model_dump_json()], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(predicate, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_two_processes_share_one_download(settings, tmp_path) -> None:
    big = _big_file(tmp_path / "big.safetensors")
    with CivitaiFixtureServer([], files={big.name: big}) as server:
        env = {**os.environ, "PYTHONPATH": str(ROOT), "DIFFGRAPH_CIVITAI_API_URL": server.api_url}
        expert = _expert(server.file_url(big.name), big)
        server.stall_download(big.name)
        first = _start(expert, env)
        _wait_for(lambda: server.count(big.name) == 1, "the first download")
        second = _start(expert, env)
        waiting = second.stderr.readline()  # the second process reports that it waits for the lock
        assert "waiting for another process" in waiting
        server.resume_downloads()
        out1, err1 = first.communicate(timeout=120)
        out2, _ = second.communicate(timeout=120)
        assert first.returncode == 0 and second.returncode == 0, err1[-2000:]
        assert out1.strip() == out2.strip() and Path(out1.strip()).read_bytes() == big.read_bytes()
        assert server.count(big.name) == 1  # one request: the second process reused the verified blob


def test_a_killed_download_releases_its_lock_and_is_resumed(settings, tmp_path) -> None:
    big = _big_file(tmp_path / "big.safetensors")
    with CivitaiFixtureServer([], files={big.name: big}) as server:
        env = {**os.environ, "PYTHONPATH": str(ROOT), "DIFFGRAPH_CIVITAI_API_URL": server.api_url}
        expert = _expert(server.file_url(big.name), big)
        part = Path(settings.data_dir) / "blobs" / "partial" / f"{expert.files[0].sha256}.part"
        server.stall_download(big.name)
        victim = _start(expert, env)
        _wait_for(lambda: part.is_file() and part.stat().st_size > 0, "bytes in the .part file")
        victim.send_signal(signal.SIGKILL)
        victim.wait(timeout=30)
        kept = part.stat().st_size
        cfg = settings.model_copy(update={"civitai_api_url": server.api_url})
        local = DownloadStore(cfg).fetch(expert)  # would block forever on a lock the dead process kept
        assert local.read_bytes() == big.read_bytes()
        assert [int(r.split("=")[1].rstrip("-")) for _, r in server.range_requests] == [kept]
