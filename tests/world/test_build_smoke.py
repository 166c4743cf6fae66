"""`diffgraph world build --quick`: every stage runs (tiny step counts), the output is a complete world that
the world's own integrity check accepts, and bad targets are refused with one line."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from deploy.cli import app


def test_quick_build_writes_a_complete_world_and_refuses_non_empty_dirs(tmp_path: Path, monkeypatch) -> None:
    runner = CliRunner()
    out = tmp_path / "world"
    result = runner.invoke(app, ["world", "build", "--quick", "--out", str(out), "--seed", "3"])
    assert result.exit_code == 0, result.output
    data = json.loads((out / "world.json").read_text())
    assert {"tokenizer", "vae", "base", "reader", "reader-vae", "decoder", "clip", "export"} <= set(data["timings_s"])
    assert len(data["experts"]) == 13
    for rel in data["files"]:
        assert (out / rel).is_file(), rel
    homepages = json.loads((out / "homepages.json").read_text())["items"]
    assert len(homepages) == 13
    for page, expert in zip(homepages, data["experts"], strict=True):
        f = page["modelVersions"][0]["files"][0]
        assert f["hashes"]["SHA256"].lower() == data["files"][expert["file"]]

    from world import integrity

    monkeypatch.setenv("DIFFGRAPH_WORLD_DIR", str(out))
    integrity._verified.cache_clear()
    assert len(integrity.verify_all()) == len(data["files"])

    # one process at a time runs the same stages and writes the same files
    seq = tmp_path / "sequential"
    one = runner.invoke(app, ["world", "build", "--quick", "--out", str(seq), "--seed", "3", "--jobs", "1"])
    assert one.exit_code == 0, one.output
    seq_data = json.loads((seq / "world.json").read_text())
    assert set(seq_data["files"]) == set(data["files"]) and set(seq_data["timings_s"]) == set(data["timings_s"])

    again = runner.invoke(app, ["world", "build", "--quick", "--out", str(out)])
    assert again.exit_code == 1 and "not empty" in again.output and "--force" in again.output
    not_dir = tmp_path / "file"
    not_dir.write_text("x")
    bad = runner.invoke(app, ["world", "build", "--quick", "--out", str(not_dir)])
    assert bad.exit_code == 1 and "not a directory" in bad.output
    integrity._verified.cache_clear()
