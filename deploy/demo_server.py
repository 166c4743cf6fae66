"""A loopback server speaking the real Civitai API shape, so the demo crawls the mini world's homepages
through the same spider, downloads and registration as a real crawl (also used by the CPU benchmarks).

``CivitaiServer`` serves ``/api/v1/models`` (cursor pagination, ``types``/``baseModels``/``nsfw``
filters), ``/api/v1/models/{id}``, ``/api/v1/model-versions/{id}`` and file downloads with ``Range``
support on 127.0.0.1 from a background thread. ``LoopbackServer`` is the shared plumbing; the test fakes
(``tests/fakes/servers.py``) add failure injection and a Hugging Face server on top of it.
"""

from __future__ import annotations

import copy
import json
import re
import threading
from collections.abc import Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlencode, urlsplit

RANGE = re.compile(r"bytes=(\d+)-(\d*)$")  # a resumed download's Range header
Route = tuple[int, Any, dict[str, str]] | None  # (status, JSON payload or bytes, headers); None: route wrote it


class LoopbackServer:
    """Threaded HTTP server on 127.0.0.1 (a free port); subclasses implement ``route``."""

    def __init__(self) -> None:
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # lifecycle ------------------------------------------------------------------------------------
    def start(self) -> LoopbackServer:
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                outer._handle(self)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, name=type(self).__name__, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> Any:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def base_url(self) -> str:
        assert self._httpd is not None, "server not started"
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    # request handling -----------------------------------------------------------------------------
    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        result = self._route(h)
        if result is not None:
            self._send(h, *result)

    def _route(self, h: BaseHTTPRequestHandler) -> tuple[int, bytes, dict[str, str]] | None:
        """``route``'s answer with its body encoded; None when the response is already written."""
        parts = urlsplit(h.path)
        try:
            result = self.route(unquote(parts.path), parse_qs(parts.query), h)
        except Exception as exc:  # a bug in the served data shows up as a 500, not a hung client
            self._send(h, 500, json.dumps({"error": str(exc)}).encode())
            return None
        if result is None:
            return None  # the route wrote the response itself (files)
        status, payload, headers = result
        return status, payload if isinstance(payload, bytes) else json.dumps(payload).encode(), headers

    def route(self, path: str, query: dict[str, list[str]], h: BaseHTTPRequestHandler) -> Route:
        raise NotImplementedError

    @staticmethod
    def _send(h: BaseHTTPRequestHandler, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        h.send_response(status)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        h.end_headers()
        h.wfile.write(body)

    def _send_file(self, h: BaseHTTPRequestHandler, path: Path | None, target: str) -> None:
        """A file with ``Range: bytes=N-`` support (a resumed download)."""
        if path is None or not path.is_file():
            self._send(h, 404, b'{"error":"no such file"}')
            return
        data = path.read_bytes()
        start, status = 0, 200
        match = RANGE.match(h.headers.get("Range", "") or "")
        if match:
            start = int(match.group(1))
            if start >= len(data):
                self._send(h, 416, b"", headers={"Content-Range": f"bytes */{len(data)}"})
                return
            status = 206
        chunk = data[start:]
        h.send_response(status)
        h.send_header("Content-Type", "application/octet-stream")
        h.send_header("Content-Length", str(len(chunk)))
        h.send_header("Accept-Ranges", "bytes")
        if status == 206:
            h.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        h.end_headers()
        self._write_body(h, chunk, target)

    def _write_body(self, h: BaseHTTPRequestHandler, chunk: bytes, target: str) -> None:
        try:
            h.wfile.write(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client went away (a killed download)


class CivitaiServer(LoopbackServer):
    """The Civitai API over ``items`` (``/api/v1/models`` records), served in the given order (newest
    first, like ``sort=Newest``); ``items`` may change between crawls."""

    def __init__(self, items: Iterable[dict[str, Any]], files: dict[str, Path] | None = None,
                 page_size: int = 100) -> None:
        super().__init__()
        self.items: list[dict[str, Any]] = list(items)
        self.files: dict[str, Path] = dict(files or {})
        self.page_size = page_size

    def __enter__(self) -> CivitaiServer:
        self.start()
        return self

    @property
    def api_url(self) -> str:
        return f"{self.base_url}/api/v1"

    def file_url(self, name: str) -> str:
        return f"{self.base_url}/api/download/files/{quote(name)}"

    def add_file(self, path: Path, name: str | None = None) -> str:
        """Serve ``path`` and return its download URL."""
        self.files[name or path.name] = path
        return self.file_url(name or path.name)

    def route(self, path: str, query: dict[str, list[str]], h: BaseHTTPRequestHandler) -> Route:
        if path == "/api/v1/models":
            return self._models(query)
        if m := re.fullmatch(r"/api/v1/models/(\d+)", path):
            model = next((i for i in self.items if str(i.get("id")) == m.group(1)), None)
            return (200, model, {}) if model else (404, {"error": "Model not found"}, {})
        if m := re.fullmatch(r"/api/v1/model-versions/(\d+)", path):
            return self._version(m.group(1))
        if path.startswith("/api/download/files/"):
            name = path[len("/api/download/files/") :]
            self._send_file(h, self.files.get(name), h.path)
            return None
        return 404, {"error": "not found"}, {}

    def _models(self, query: dict[str, list[str]]) -> Route:
        limit = max(1, min(100, int(query.get("limit", [self.page_size])[0])))
        limit = min(limit, self.page_size)
        types = set(query.get("types", []))
        bases = set(query.get("baseModels", []))
        allow_nsfw = query.get("nsfw", ["true"])[0].lower() != "false"
        selected = []
        for item in self.items:
            if not isinstance(item, dict):
                selected.append(item)
                continue
            if types and item.get("type") not in types:
                continue
            if not allow_nsfw and item.get("nsfw"):
                continue
            if bases:
                versions = [v for v in item.get("modelVersions") or [] if v.get("baseModel") in bases]
                if not versions:
                    continue
                item = {**item, "modelVersions": versions}
            selected.append(item)
        offset = int(query.get("cursor", ["0"])[0] or 0)
        page = selected[offset : offset + limit]
        metadata: dict[str, Any] = {"pageSize": limit}
        if offset + limit < len(selected):
            nxt = {k: v for k, v in query.items() if k != "cursor"}
            nxt["cursor"] = [str(offset + limit)]
            metadata["nextCursor"] = str(offset + limit)
            metadata["nextPage"] = f"{self.api_url}/models?{urlencode(nxt, doseq=True)}"
        return 200, {"items": copy.deepcopy(page), "metadata": metadata}, {}

    def _version(self, version_id: str) -> Route:
        for item in self.items:
            for v in item.get("modelVersions") or []:
                if str(v.get("id")) == version_id:
                    model = {k: item.get(k) for k in ("name", "type", "nsfw", "poi")}
                    return 200, {**copy.deepcopy(v), "modelId": item["id"], "model": model}, {}
        return 404, {"error": "Model version not found"}, {}
