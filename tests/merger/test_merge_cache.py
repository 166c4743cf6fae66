"""The merge cache: bounded by size with least-recently-used eviction, one build per merge across
processes, and half-written merges of dead processes removed."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from core.settings import Settings
from merger.merge import merged_checkpoint
from merger.merge_cache import STALE_PARTIAL_S
from tests.fakes.zoo import TinyZoo, build_tiny_zoo

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> TinyZoo:
    return build_tiny_zoo(tmp_path_factory.getbasetemp() / "merger-tiny-zoo")  # shared with the other merger tests


def _merge(settings: Settings, zoo: TinyZoo, weight: float) -> Path:
    return merged_checkpoint(settings, zoo.base_file, [(zoo.checkpoints[0], weight)], "task_arithmetic", dtype="fp16")


def test_the_cache_stays_under_its_bound_evicting_the_least_recently_used(zoo: TinyZoo, tmp_path: Path) -> None:
    probe = _merge(Settings(data_dir=tmp_path / "probe"), zoo, 0.5)
    size = probe.stat().st_size
    settings = Settings(data_dir=tmp_path / "var", merge_cache_bytes=2 * size + size // 2)  # room for two
    a = _merge(settings, zoo, 0.3)
    b = _merge(settings, zoo, 0.4)
    assert _merge(settings, zoo, 0.3) == a  # a used again: b is now the least recently used
    c = _merge(settings, zoo, 0.6)
    assert a.is_file() and c.is_file() and not b.exists()
    assert sum(p.stat().st_size for p in c.parent.glob("*.safetensors")) <= settings.merge_cache_bytes
    tiny = settings.model_copy(update={"merge_cache_bytes": 0})  # smaller than one merge: keeps the one in use
    d = _merge(tiny, zoo, 0.7)
    assert [p.name for p in d.parent.glob("*.safetensors")] == [d.name]
    assert "model.diffusion_model.input_blocks.0.0.weight" in load_file(d)


_BUILD = """
import os, sys, time
from pathlib import Path
from core.settings import Settings
from merger.merge import merged_checkpoint
go = Path(sys.argv[1])
(go.parent / f"ready-{os.getpid()}").touch()
while not go.exists():
    time.sleep(0.01)
built = []
out = merged_checkpoint(Settings(data_dir=sys.argv[2]), Path(sys.argv[3]), [(Path(sys.argv[4]), 0.5)],
                        "task_arithmetic", dtype="fp16", progress=lambda done, total: built.append(done))
print(out, bool(built))
"""


@pytest.mark.timeout(120)
def test_two_processes_build_the_same_merge_once_and_orphans_are_removed(zoo: TinyZoo, tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "var")
    merges = tmp_path / "var" / "cache" / "merges"
    merges.mkdir(parents=True)
    stale = merges / ".0123abcd.safetensors.partial-999999"  # another merge's writer died long ago
    stale.write_bytes(b"half a merge")
    os.utime(stale, (time.time() - STALE_PARTIAL_S - 60,) * 2)
    go = tmp_path / "go"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", _BUILD, str(go), str(settings.data_dir), str(zoo.base_file),
                               str(zoo.checkpoints[1])], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    deadline = time.monotonic() + 60  # every process has imported its modules and waits
    while len(list(go.parent.glob('ready-*'))) < len(procs) and time.monotonic() < deadline:
        time.sleep(0.05)
    go.touch()
    outs = [p.communicate(timeout=100) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outs]
    results = [out.split() for out, _ in outs]
    assert results[0][0] == results[1][0]  # the same file
    assert sorted(r[1] for r in results) == ["False", "True"]  # built by one, reused by the other
    assert not stale.exists() and not list(merges.glob(".*.partial-*"))
    assert "model.diffusion_model.input_blocks.0.0.weight" in load_file(results[0][0])


def test_a_dead_builders_partial_file_is_replaced(zoo: TinyZoo, tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "var")
    first = _merge(settings, zoo, 0.5)
    first.unlink()
    leftover = first.with_name(f".{first.name}.partial-999999")  # a fresh one: its key's lock proves it dead
    leftover.write_bytes(b"half a merge")
    again = _merge(settings, zoo, 0.5)
    assert again == first and again.is_file() and not leftover.exists()
