"""``diffgraph crawl`` as a user runs it: options checked before anything starts, a run that fetched nothing
exits non-zero with one line (the summary still printed)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fakes.servers import CivitaiFixtureServer

ROOT = Path(__file__).resolve().parents[2]


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "deploy.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, check=False, env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})


@pytest.mark.parametrize(("args", "message"), [
    (["--since", "garbage"], "--since must be an ISO date"),
    (["--limit", "-3"], "--limit must be 0 or more"),
    (["--kind", "embedding"], "unknown kind"),
])
def test_bad_options_fail_in_one_line_before_anything_starts(settings, args, message) -> None:
    proc = _cli("crawl", "civitai", *args)
    assert proc.returncode == 1
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in proc.stderr
    assert not Path(settings.data_dir).exists()  # no database, graph or state was created


def test_a_crawl_that_fetched_nothing_exits_1_with_the_first_failure(settings) -> None:
    with CivitaiFixtureServer([]) as server:
        server.fail("/models", ("status", 403))  # the listing refused: nothing at all could be fetched
        proc = _cli("crawl", "civitai", "--json", env={"DIFFGRAPH_CIVITAI_API_URL": server.api_url})
    assert proc.returncode == 1, proc.stderr[-2000:]
    summary = json.loads(proc.stdout)
    assert summary["failed"] == 1 and summary["new"] == 0
    assert "/models" in summary["first_failure"] and "403" in summary["first_failure"]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("error: nothing could be fetched from civitai") and "Traceback" not in proc.stderr
