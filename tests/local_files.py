"""Admit test experts' local weight files the way a user does (``diffgraph download ID --from-file``)."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import unquote, urlsplit

from core.settings import Settings
from core.types import Expert


def import_local_files(settings: Settings, experts: list[Expert]) -> None:
    """Admit the experts' local files into the weight store, as ``diffgraph download ID --from-file`` does
    (``file://`` URLs are never fetched). A corrupt fixture stays out; using it then fails cleanly."""
    from crawler.downloads import DownloadError, ensure_local

    for e in experts:
        try:
            ensure_local(settings, e, from_file=Path(unquote(urlsplit(e.files[0].url).path)))
        except DownloadError:
            pass
