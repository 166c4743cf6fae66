"""Run one crawl: in this process (Scrapy's reactor, once per process) or in a child process.

``python -m crawler.run civitai --limit 100`` is the child entry point: it reads the settings from a JSON
file (secrets never on the command line) and writes a JSON ``CrawlSummary``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import signal
import subprocess as sp
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from pydantic import SecretStr

from core.retry import Transient
from core.settings import Settings
from core.types import DiffGraphError, utcnow
from crawler.normalize.dates import parse_datetime
from crawler.state import record_run, remember_failures, save_resume_point
from crawler.stats import FIRST_FAILURE, LISTING, RESUME, RETRIED, RETRY, STOPPED

log = logging.getLogger(__name__)
SOURCES = ("civitai", "huggingface")
_reactor_used = False
# Between SIGTERM and SIGKILL for a crawl child past its timeout: Scrapy's graceful stop waits for the
# requests in flight, so this exceeds DOWNLOAD_TIMEOUT (60 s).
STOP_GRACE_S = 90.0


class CrawlError(DiffGraphError):
    """A crawl could not run (bad arguments, or the child process died)."""


class CrawlProcessFailed(CrawlError, Transient):
    """The crawl's child process died or left no summary: a later attempt may succeed."""


class NothingFetched(CrawlError, Transient):
    """Every page or record failed: the source is down or refusing us, so a later attempt may succeed."""


@dataclass
class CrawlSummary:
    """Counts of one run. ``skipped``: known-unchanged, duplicates, filtered by policy; ``failed``: broken
    pages and records that could not become experts."""

    source: str
    new: int = 0
    updated: int = 0
    skipped: int = 0
    failed: int = 0
    requests: int = 0
    retried: int = 0  # versions that failed transiently before and were fetched again first
    elapsed_s: float = 0.0
    finish_reason: str = ""
    stopped_at: str = ""
    skipped_reasons: dict[str, int] = field(default_factory=dict)
    failed_reasons: dict[str, int] = field(default_factory=dict)
    anomalies: dict[str, int] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    first_failure: str | None = None  # the first failed page or record, "<url or id>: <reason>"

    @property
    def nothing_fetched(self) -> bool:
        """Every page or record of the run failed: nothing was registered, updated or even seen as known."""
        return self.failed > 0 and self.new == self.updated == self.skipped == 0

    def counts(self) -> dict[str, int]:
        return {"new": self.new, "updated": self.updated, "skipped": self.skipped, "failed": self.failed}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CrawlSummary:
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})

    @classmethod
    def from_stats(cls, source: str, stats: dict[str, Any]) -> CrawlSummary:
        def group(prefix: str) -> dict[str, Any]:
            return {k[len(prefix) :]: v for k, v in stats.items() if k.startswith(prefix)}

        skipped = {k: int(v) for k, v in group("diffgraph/skipped/").items()}
        if stats.get("diffgraph/unchanged"):
            skipped["unchanged_in_graph"] = int(stats["diffgraph/unchanged"])
        failed = {k: int(v) for k, v in group("diffgraph/failed/").items()}
        start, finish = stats.get("start_time"), stats.get("finish_time")
        elapsed = (finish - start).total_seconds() if start and finish else float(stats.get("elapsed_time_seconds", 0))
        return cls(
            source=source,
            new=int(stats.get("diffgraph/new", 0)),
            updated=int(stats.get("diffgraph/updated", 0)),
            skipped=sum(skipped.values()),
            failed=sum(failed.values()),
            requests=int(stats.get("downloader/request_count", 0)),
            retried=int(stats.get(RETRIED, 0)),
            elapsed_s=round(elapsed, 3),
            finish_reason=str(stats.get("finish_reason", "")),
            stopped_at=str(stats.get(STOPPED, "")),
            skipped_reasons=skipped,
            failed_reasons=failed,
            anomalies={k: int(v) for k, v in group("diffgraph/anomaly/").items()},
            timings={k: round(float(v), 4) for k, v in group("diffgraph/time/").items()},
            first_failure=stats.get(FIRST_FAILURE) or None,
        )


def validate_options(source: str, limit: int | None, since: str | datetime | None) -> datetime | None:
    """Check a crawl's options before anything starts (``CrawlError``, one line); returns ``since`` parsed."""
    if source not in SOURCES:
        raise CrawlError(f"unknown source {source!r}; choose one of: {', '.join(SOURCES)}")
    if limit is not None and limit < 0:
        raise CrawlError(f"--limit must be 0 or more, got {limit}")
    if since is None or isinstance(since, datetime):
        return since
    parsed = parse_datetime(since)
    if parsed is None:
        raise CrawlError(f"--since must be an ISO date such as 2024-01-31, got {str(since)[:100]!r}")
    return parsed


def crawl(
    settings: Settings,
    source: str,
    limit: int | None = None,
    base_model: str | None = None,
    kind: str | None = None,
    since: str | datetime | None = None,
    subprocess: bool = False,
    *,
    version_ids: list[str] | None = None,
    progress: Callable[[CrawlSummary], None] | None = None,
    log_level: str | None = None,
) -> CrawlSummary:
    """Crawl ``source`` (``civitai`` | ``huggingface``) into the graph and the SQL records.

    Args:
        limit: items of this run at most (default ``settings.crawl_item_limit``).
        base_model / kind / since: source filters (``since`` is an ISO date).
        subprocess: run Scrapy in a child process (required inside Celery workers and for a second
            crawl in one process: Twisted's reactor cannot restart). Used automatically for a second
            in-process crawl. The child is stopped after ``settings.crawl_timeout_s`` (SIGTERM, then
            SIGKILL ``STOP_GRACE_S`` later); its log lines are re-logged here at their own level.
        version_ids: Civitai refresh mode (``/model-versions/{id}``).
        progress: called with the running summary after each item (in-process only).

    Returns the run's ``CrawlSummary``; the run is also added to the source's ``CrawlState``.

    Example::

        summary = crawl(get_settings(), "civitai", limit=50, base_model="SD 1.5")
    """
    since = validate_options(source, limit, since)
    if kind is not None and kind not in {"checkpoint", "lora", "locon"}:
        raise CrawlError(f"unknown kind {kind!r}; choose checkpoint, lora or locon")
    if version_ids and source != "civitai":
        raise CrawlError("refreshing by version id is only available for civitai")
    if version_ids and not all(v.isdigit() for v in version_ids):
        raise CrawlError(f"Civitai version ids are numbers, got {', '.join(repr(v) for v in version_ids)}")
    if subprocess or _reactor_used:
        return _crawl_in_child(settings, source, limit, base_model, kind, since, version_ids,
                               timeout_s=settings.crawl_timeout_s)
    return _crawl_here(settings, source, limit, base_model, kind, since, version_ids, progress,
                       log_level or settings.log_level)


def _crawl_here(
    settings: Settings,
    source: str,
    limit: int | None,
    base_model: str | None,
    kind: str | None,
    since: str | datetime | None,
    version_ids: list[str] | None,
    progress: Callable[[CrawlSummary], None] | None,
    log_level: str,
) -> CrawlSummary:
    global _reactor_used
    from scrapy import signals
    from scrapy.crawler import CrawlerProcess

    from crawler.settings import scrapy_settings
    from crawler.spiders import SPIDERS

    started = utcnow()
    process = CrawlerProcess(scrapy_settings(settings, limit, LOG_LEVEL=log_level))
    crawler = process.create_crawler(SPIDERS[source])
    errors: list[str] = []

    def on_error(failure: Any, response: Any = None, spider: Any = None) -> None:
        errors.append(str(getattr(failure, "value", failure))[:500])

    crawler.signals.connect(on_error, signal=signals.spider_error)
    if progress is not None:

        def tick(*_: Any, **__: Any) -> None:
            progress(CrawlSummary.from_stats(source, crawler.stats.get_stats()))

        for sig in (signals.item_scraped, signals.item_dropped):
            crawler.signals.connect(tick, signal=sig, weak=False)
    kwargs: dict[str, Any] = {"limit": limit if limit is not None else settings.crawl_item_limit,
                              "base_model": base_model, "kind": kind, "since": since}
    if version_ids:
        kwargs["version_ids"] = version_ids
    _reactor_used = True
    process.crawl(crawler, **kwargs)
    process.start()
    stats = crawler.stats.get_stats() or {}
    summary = CrawlSummary.from_stats(source, stats)
    if errors:
        summary.error = errors[0]
    elif summary.nothing_fetched:
        summary.error = f"nothing could be fetched from {source}: {summary.first_failure}"
    if stats.get(RESUME) is not None and stats.get(LISTING):
        save_resume_point(settings, source, stats[LISTING], stats[RESUME] or None)
    remember_failures(settings, source, stats.get(RETRY) or {})
    record_run(settings, source, summary.counts(), error=summary.error, started_at=started)
    return summary


def _settings_payload(settings: Settings) -> dict[str, Any]:
    data = settings.model_dump(mode="json")
    for name in type(settings).model_fields:
        value = getattr(settings, name)
        if isinstance(value, SecretStr):
            data[name] = value.get_secret_value()
    return data


def _crawl_in_child(
    settings: Settings,
    source: str,
    limit: int | None,
    base_model: str | None,
    kind: str | None,
    since: str | datetime | None,
    version_ids: list[str] | None,
    timeout_s: float | None = None,
) -> CrawlSummary:
    with tempfile.TemporaryDirectory(prefix="diffgraph-crawl-") as tmp:
        settings_file = Path(tmp) / "settings.json"
        summary_file = Path(tmp) / "summary.json"
        fd = os.open(settings_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump(_settings_payload(settings), fh)
        cmd = [sys.executable, "-m", "crawler.run", source, "--settings-json", str(settings_file),
               "--summary-json", str(summary_file)]
        if limit is not None:
            cmd += ["--limit", str(limit)]
        if base_model:
            cmd += ["--base-model", base_model]
        if kind:
            cmd += ["--kind", kind]
        if since:
            cmd += ["--since", since.isoformat() if isinstance(since, datetime) else str(since)]
        if version_ids:
            cmd += ["--version-ids", ",".join(version_ids)]
        root = str(Path(__file__).resolve().parent.parent)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])),
               "TQDM_DISABLE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}  # its stderr is a log, not a terminal
        start = time.perf_counter()
        proc = sp.Popen(cmd, env=env, stdin=sp.DEVNULL, stdout=sp.DEVNULL, stderr=sp.PIPE, text=True,
                        errors="replace")
        tail: deque[str] = deque(maxlen=5)
        relay = threading.Thread(target=_relay_log, args=(proc.stderr, source, tail), daemon=True)
        relay.start()
        timed_out = _wait_or_stop(proc, source, timeout_s)
        relay.join(timeout=10)
        if proc.returncode != 0 or not summary_file.exists():
            why = (f"ran past {timeout_s:.0f}s (DIFFGRAPH_CRAWL_TIMEOUT_S) and was stopped" if timed_out
                   else f"failed in its child process (exit {proc.returncode})")
            raise CrawlProcessFailed(f"crawl of {source} {why}: " + " | ".join(tail)[-800:])
        summary = CrawlSummary.from_dict(json.loads(summary_file.read_text()))
        if timed_out:  # stopped gracefully: its counts and resume point were saved
            summary.error = f"stopped after {timeout_s:.0f}s (DIFFGRAPH_CRAWL_TIMEOUT_S); the next run resumes"
        log.info("child crawl of %s done in %.1fs", source, time.perf_counter() - start)
        return summary


def _wait_or_stop(proc: sp.Popen[str], source: str, timeout_s: float | None) -> bool:
    """Wait for the crawl child; past ``timeout_s`` stop it: SIGTERM (Scrapy closes the spider, which saves
    its counts and resume point), then SIGKILL after ``STOP_GRACE_S``. Returns whether it timed out."""
    try:
        proc.wait(timeout=timeout_s)
        return False
    except sp.TimeoutExpired:
        pass
    log.warning("crawl of %s ran past %.0fs; stopping it (SIGTERM)", source, timeout_s or 0)
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=STOP_GRACE_S)
    except sp.TimeoutExpired:
        log.error("crawl of %s did not stop within %.0fs of SIGTERM; killing it", source, STOP_GRACE_S)
        proc.kill()
        proc.wait()
    return True


# Scrapy's LOG_FORMAT: "2024-01-31 12:00:00 [name] LEVEL: message"
_LOG_LINE = re.compile(r"^\S+ \S+ \[(?P<name>[^\]]+)\] (?P<level>DEBUG|INFO|WARNING|ERROR|CRITICAL): (?P<msg>.*)$")


def _relay_log(stream: Any, source: str, tail: deque[str]) -> None:
    """Re-log the child's log lines in this process at their own level (a worker's log shows a scheduled
    crawl's warnings, not only its failures); continuation lines (tracebacks) keep the last level."""
    level, name = logging.WARNING, "crawler.child"
    for raw in stream:
        line = raw.rstrip("\n")
        if not line.strip():
            continue
        match = _LOG_LINE.match(line)
        if match:
            level, name = getattr(logging, match["level"]), match["name"]
            line = match["msg"]
        logging.getLogger(f"crawler.child.{source}.{name}").log(level, "%s", line)
        tail.append(line[:300])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m crawler.run", description="Run one crawl (child process).")
    parser.add_argument("source", choices=SOURCES)
    parser.add_argument("--limit", type=int)
    parser.add_argument("--base-model")
    parser.add_argument("--kind")
    parser.add_argument("--since")
    parser.add_argument("--version-ids")
    parser.add_argument("--settings-json", type=Path)
    parser.add_argument("--summary-json", type=Path)
    args = parser.parse_args(argv)
    settings = Settings(**json.loads(args.settings_json.read_text())) if args.settings_json else Settings()
    summary = crawl(
        settings,
        args.source,
        limit=args.limit,
        base_model=args.base_model,
        kind=args.kind,
        since=args.since,
        version_ids=args.version_ids.split(",") if args.version_ids else None,
    )
    text = json.dumps(summary.to_dict(), default=str)
    if args.summary_json:
        args.summary_json.write_text(text)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
