"""Local fixture servers speaking the real Civitai and Hugging Face API shapes (tests, demos, benchmarks).

Both serve on 127.0.0.1 from a background thread, record every request (``.requests``) and accept
injected failures (``.fail(match, *actions)``) so retries, broken pages and interrupted downloads can be
exercised offline:

* ``("status", 429, 2)`` — that status with ``Retry-After: 2`` (``None`` = no header)
* ``"truncated"`` — the JSON body cut in half (still a 200)
* ``"drop"`` — a file download that closes the connection half-way through the body
* ``"stall"`` — a file download that stops half-way until ``resume_downloads()``

Example::

    item = civitai_item_for(zoo.loras_kohya[0], name="Ink style", tags=["style"])
    with CivitaiFixtureServer([item], files={zoo.loras_kohya[0].name: zoo.loras_kohya[0]}) as server:
        settings = Settings(civitai_api_url=server.api_url, ...)
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
import threading
from collections import deque
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlencode, urlsplit

Action = str | tuple[Any, ...]
_RANGE = re.compile(r"bytes=(\d+)-(\d*)$")


class _FixtureServer:
    """Threaded HTTP server with request log and failure injection; subclasses implement ``route``."""

    def __init__(self) -> None:
        self.requests: list[str] = []
        self.range_requests: list[tuple[str, str]] = []  # (path, Range header) of resumed downloads
        self._failures: list[tuple[str, deque[Action]]] = []
        self._lock = threading.Lock()
        self._resume = threading.Event()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # lifecycle ------------------------------------------------------------------------------------
    def start(self) -> _FixtureServer:
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
        self._resume.set()  # let a stalled download finish
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

    # failure injection ----------------------------------------------------------------------------
    def fail(self, match: str, *actions: Action) -> None:
        """The next requests whose path+query contains ``match`` get ``actions``, one each, in order."""
        with self._lock:
            self._failures.append((match, deque(actions)))

    def count(self, match: str) -> int:
        """How many requests contained ``match`` in their path+query."""
        with self._lock:
            return sum(1 for r in self.requests if match in r)

    def _next_failure(self, target: str) -> Action | None:
        with self._lock:
            for match, queue in self._failures:
                if match in target and queue:
                    return queue.popleft()
        return None

    # request handling -----------------------------------------------------------------------------
    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        with self._lock:
            self.requests.append(h.path)
        action = self._next_failure(h.path)
        if isinstance(action, tuple) and action[0] == "status":
            code, retry_after = action[1], action[2] if len(action) > 2 else None
            headers = {"Retry-After": str(retry_after)} if retry_after is not None else {}
            self._send(h, code, json.dumps({"error": f"injected {code}"}).encode(), headers=headers)
            return
        parts = urlsplit(h.path)
        query = parse_qs(parts.query)
        try:
            result = self.route(unquote(parts.path), query, h)
        except Exception as exc:  # a fixture bug shows up as a 500, not a hung test
            self._send(h, 500, json.dumps({"error": str(exc)}).encode())
            return
        if result is None:
            return  # the route wrote the response itself (files)
        status, payload, headers = result
        body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        if action == "truncated":
            body = body[: max(1, len(body) // 2)]
        self._send(h, status, body, headers=headers)

    def route(self, path: str, query: dict[str, list[str]], h: BaseHTTPRequestHandler) -> Any:
        raise NotImplementedError

    @staticmethod
    def _send(h: BaseHTTPRequestHandler, status: int, body: bytes, content_type: str = "application/json",
              headers: dict[str, str] | None = None) -> None:
        h.send_response(status)
        h.send_header("Content-Type", content_type)
        h.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        h.end_headers()
        h.wfile.write(body)

    def _send_file(self, h: BaseHTTPRequestHandler, path: Path | None, target: str) -> None:
        """A file with ``Range: bytes=N-`` support; an injected ``"drop"`` cuts the body half-way."""
        if path is None or not path.is_file():
            self._send(h, 404, b'{"error":"no such file"}')
            return
        data = path.read_bytes()
        start, status = 0, 200
        match = _RANGE.match(h.headers.get("Range", "") or "")
        if match:
            with self._lock:
                self.range_requests.append((h.path, h.headers["Range"]))
            start = int(match.group(1))
            if start >= len(data):
                self._send(h, 416, b"", headers={"Content-Range": f"bytes */{len(data)}"})
                return
            status = 206
        chunk = data[start:]
        action = self._next_failure(target + "#drop")
        drop = action == "drop"
        h.send_response(status)
        h.send_header("Content-Type", "application/octet-stream")
        h.send_header("Content-Length", str(len(chunk)))
        h.send_header("Accept-Ranges", "bytes")
        if status == 206:
            h.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        h.end_headers()
        if drop:
            h.wfile.write(chunk[: len(chunk) // 2])
            h.wfile.flush()
            h.close_connection = True
            h.connection.close()
            return
        if action == "stall":  # half the body, then wait for ``resume_downloads`` (or the client to go)
            h.wfile.write(chunk[: len(chunk) // 2])
            h.wfile.flush()
            self._resume.wait(60)
            chunk = chunk[len(chunk) // 2 :]
        try:
            h.wfile.write(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client went away (a killed download)

    def stall_download(self, name: str, times: int = 1) -> None:
        """The next ``times`` downloads of ``name`` send half the body, then wait for ``resume_downloads``."""
        self._resume.clear()
        self.fail(f"{quote(name)}#drop", *(["stall"] * times))

    def resume_downloads(self) -> None:
        self._resume.set()

    def drop_download(self, name: str, times: int = 1) -> None:
        """The next ``times`` downloads of file ``name`` close the connection half-way."""
        self.fail(f"{quote(name)}#drop", *(["drop"] * times))


# --------------------------------------------------------------------------------------------------
# Civitai
# --------------------------------------------------------------------------------------------------
def civitai_item_for(
    path: Path | None = None,
    *,
    name: str | None = None,
    type: str = "LORA",
    base_model: str = "SD 1.5",
    trained_words: Sequence[str] = (),
    tags: Sequence[str] = (),
    description: str = "",
    model_id: int | None = None,
    version_id: int | None = None,
    nsfw: bool = False,
    download_url: str = "",
    file_name: str | None = None,
    sha256: str | None = None,
    size_kb: float | None = None,
    fmt: str | None = None,
    creator: str = "diffgraph-fixtures",
    created_at: datetime | None = None,
    downloads: int = 100,
    rating: float = 4.5,
) -> dict[str, Any]:
    """A ``/api/v1/models`` item (2023/2025 field set) with one version and one file describing ``path``.

    Ids default to values derived from the file's SHA-256 (stable across runs). ``download_url`` is
    usually ``server.file_url(path.name)``.
    """
    data = path.read_bytes() if path is not None else b""
    digest = sha256 or hashlib.sha256(data).hexdigest()
    model_id = model_id if model_id is not None else int(digest[:7], 16)
    version_id = version_id if version_id is not None else int(digest[7:14], 16)
    file_name = file_name or (path.name if path is not None else f"{model_id}.safetensors")
    fmt = fmt or ("SafeTensor" if file_name.endswith(".safetensors") else "PickleTensor")
    stamp = (created_at or datetime(2025, 1, 1, tzinfo=UTC)).astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z")
    url = download_url or f"https://civitai.com/api/download/models/{version_id}"
    return {
        "id": model_id,
        "name": name or Path(file_name).stem,
        "description": description,
        "type": type,
        "poi": False,
        "nsfw": nsfw,
        "nsfwLevel": 16 if nsfw else 1,
        "allowNoCredit": True,
        "allowCommercialUse": ["Image", "Rent"],
        "allowDerivatives": True,
        "allowDifferentLicense": True,
        "stats": {"downloadCount": downloads, "favoriteCount": downloads // 10, "commentCount": 0,
                  "ratingCount": 3, "rating": rating},
        "creator": {"username": creator, "image": None},
        "tags": list(tags),
        "modelVersions": [
            {
                "id": version_id,
                "modelId": model_id,
                "name": "v1.0",
                "createdAt": stamp,
                "updatedAt": stamp,
                "trainedWords": list(trained_words),
                "baseModel": base_model,
                "baseModelType": "Standard",
                "earlyAccessTimeFrame": 0,
                "description": None,
                "nsfwLevel": 16 if nsfw else 1,
                "stats": {"downloadCount": downloads, "ratingCount": 3, "rating": rating},
                "files": [
                    {
                        "id": version_id,
                        "name": file_name,
                        "sizeKB": size_kb if size_kb is not None else len(data) / 1024,
                        "type": "Model",
                        "metadata": {"fp": "fp16", "size": "pruned", "format": fmt},
                        "pickleScanResult": "Success",
                        "pickleScanMessage": "No Pickle imports",
                        "virusScanResult": "Success",
                        "scannedAt": stamp,
                        "hashes": {"AutoV2": digest[:10].upper(), "SHA256": digest.upper()},
                        "downloadUrl": url,
                        "primary": True,
                    }
                ],
                "images": [],
                "downloadUrl": url,
            }
        ],
    }


class CivitaiFixtureServer(_FixtureServer):
    """``/api/v1/models`` (cursor pagination, ``types``/``baseModels``/``nsfw`` filters),
    ``/api/v1/models/{id}``, ``/api/v1/model-versions/{id}`` and file downloads with Range support.

    ``items`` are served in the given order (newest first, like ``sort=Newest``); tests may change the
    list (e.g. ``server.items.insert(0, new_item)``) between crawls.
    """

    def __init__(self, items: Iterable[dict[str, Any]], files: dict[str, Path] | None = None,
                 page_size: int = 100) -> None:
        super().__init__()
        self.items: list[dict[str, Any]] = list(items)
        self.files: dict[str, Path] = dict(files or {})
        self.page_size = page_size

    def __enter__(self) -> CivitaiFixtureServer:
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

    def route(self, path: str, query: dict[str, list[str]], h: BaseHTTPRequestHandler) -> Any:
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

    def _models(self, query: dict[str, list[str]]) -> Any:
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

    def _version(self, version_id: str) -> Any:
        for item in self.items:
            for v in item.get("modelVersions") or []:
                if str(v.get("id")) == version_id:
                    model = {k: item.get(k) for k in ("name", "type", "nsfw", "poi")}
                    return 200, {**copy.deepcopy(v), "modelId": item["id"], "model": model}, {}
        return 404, {"error": "Model version not found"}, {}


# --------------------------------------------------------------------------------------------------
# Hugging Face
# --------------------------------------------------------------------------------------------------
def hf_model_for(
    repo_id: str,
    files: dict[str, Path] | None = None,
    *,
    tags: Sequence[str] = ("diffusers", "lora", "text-to-image", "template:sd-lora"),
    base_model: str = "runwayml/stable-diffusion-v1-5",
    sha: str | None = None,
    last_modified: datetime | None = None,
    downloads: int = 10,
    likes: int = 1,
) -> dict[str, Any]:
    """A Hub model-info response (``/api/models/{repo}?blobs=true`` shape) for local weight files."""
    files = files or {}
    siblings: list[dict[str, Any]] = [{"rfilename": ".gitattributes"}, {"rfilename": "README.md"}]
    for name, path in files.items():
        data = path.read_bytes()
        siblings.append({"rfilename": name, "size": len(data), "blobId": hashlib.sha1(data).hexdigest(),
                         "lfs": {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}})
    stamp = (last_modified or datetime(2025, 1, 1, tzinfo=UTC)).strftime("%Y-%m-%dT%H:%M:%S.000Z")
    return {
        "_id": hashlib.md5(repo_id.encode()).hexdigest()[:24],  # noqa: S324 (an id, not security)
        "id": repo_id,
        "modelId": repo_id,
        "author": repo_id.split("/")[0],
        "sha": sha or hashlib.sha1(repo_id.encode()).hexdigest(),
        "lastModified": stamp,
        "createdAt": stamp,
        "private": False,
        "gated": False,
        "disabled": False,
        "downloads": downloads,
        "likes": likes,
        "library_name": "diffusers",
        "pipeline_tag": "text-to-image",
        "tags": [*tags, f"base_model:{base_model}", "license:creativeml-openrail-m", "region:us"],
        "cardData": {"base_model": base_model, "license": "creativeml-openrail-m", "tags": list(tags)},
        "siblings": siblings,
    }


class HFFixtureServer(_FixtureServer):
    """``/api/models`` (``Link: <…>; rel="next"`` pagination, ``filter``/``library`` filters),
    ``/api/models/{repo_id}``, ``/{repo_id}/raw/main/README.md`` and ``/{repo_id}/resolve/{rev}/{file}``."""

    def __init__(self, models: Iterable[dict[str, Any]], cards: dict[str, str] | None = None,
                 files: dict[str, Path] | None = None, page_size: int = 100) -> None:
        super().__init__()
        self.models: list[dict[str, Any]] = list(models)
        self.cards: dict[str, str] = dict(cards or {})
        self.files: dict[str, Path] = dict(files or {})  # "<repo_id>/<rfilename>" -> path
        self.page_size = page_size

    def __enter__(self) -> HFFixtureServer:
        self.start()
        return self

    @property
    def hf_url(self) -> str:
        return self.base_url

    def _find(self, repo_id: str) -> dict[str, Any] | None:
        return next((m for m in self.models if m.get("id") == repo_id), None)

    def route(self, path: str, query: dict[str, list[str]], h: BaseHTTPRequestHandler) -> Any:
        if path == "/api/models":
            return self._list(query)
        if path.startswith("/api/models/"):
            model = self._find(path[len("/api/models/") :])
            if model is None:
                return 404, {"error": "Repository not found"}, {}
            info = copy.deepcopy(model)
            if query.get("blobs", ["false"])[0].lower() != "true":
                info["siblings"] = [{"rfilename": s["rfilename"]} for s in info.get("siblings", [])]
            return 200, info, {}
        if m := re.fullmatch(r"/(.+?/[^/]+)/raw/main/README\.md", path):
            card = self.cards.get(m.group(1))
            return (200, card.encode(), {}) if card is not None else (404, b"Entry not found", {})
        if m := re.fullmatch(r"/(.+?/[^/]+)/resolve/[^/]+/(.+)", path):
            self._send_file(h, self.files.get(f"{m.group(1)}/{m.group(2)}"), h.path)
            return None
        return 404, {"error": "not found"}, {}

    def _list(self, query: dict[str, list[str]]) -> Any:
        limit = min(self.page_size, max(1, int(query.get("limit", [self.page_size])[0])))
        filters = query.get("filter", [])
        library = query.get("library", [None])[0]
        selected = []
        for m in self.models:
            tags = set(m.get("tags") or [])
            if library and m.get("library_name") != library and library not in tags:
                continue
            if any(f not in tags for f in filters):
                continue
            selected.append(m)
        offset = int(query.get("cursor", ["0"])[0] or 0)
        page = selected[offset : offset + limit]
        headers = {}
        if offset + limit < len(selected):
            nxt = {k: v for k, v in query.items() if k != "cursor"}
            nxt["cursor"] = [str(offset + limit)]
            headers["Link"] = f'<{self.base_url}/api/models?{urlencode(nxt, doseq=True)}>; rel="next"'
        full = query.get("full", ["false"])[0].lower() == "true"
        out = []
        for m in page:
            entry = copy.deepcopy(m)
            entry["siblings"] = [{"rfilename": s["rfilename"]} for s in m.get("siblings", [])] if full else []
            entry.pop("cardData", None)
            out.append(entry)
        return 200, out, headers


# --------------------------------------------------------------------------------------------------
# OpenAI-compatible chat endpoint
# --------------------------------------------------------------------------------------------------
class FakeLLMServer:
    """A loopback OpenAI-compatible ``POST /v1/chat/completions`` that answers with ``replies`` (one per
    call, the last one repeated; an ``int`` is sent as that HTTP error status) and records each request
    body in ``.calls``. Point
    ``llm_base_url`` at ``.base_url`` to exercise the real ``openai`` client path."""

    def __init__(self, replies: Sequence[str | int]) -> None:
        self.replies = list(replies)
        self.calls: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._httpd: ThreadingHTTPServer | None = None

    def __enter__(self) -> FakeLLMServer:
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                length = int(self.headers.get("Content-Length", "0") or 0)
                body = json.loads(self.rfile.read(length) or b"{}")
                with outer._lock:
                    outer.calls.append(body)
                    idx = min(len(outer.calls) - 1, len(outer.replies) - 1)
                    content = outer.replies[idx]
                if isinstance(content, int):  # an HTTP error status: the endpoint is failing
                    self.send_response(content)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("retry-after-ms", "1")  # the openai client's own retry, at once
                    self.send_header("Content-Length", "2")
                    self.end_headers()
                    self.wfile.write(b"{}")
                    return
                reply = {
                    "id": f"chatcmpl-{len(outer.calls)}",
                    "object": "chat.completion",
                    "created": 0,
                    "model": body.get("model", "fake"),
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                                 "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
                }
                data = json.dumps(reply).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        threading.Thread(target=self._httpd.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()

    @property
    def base_url(self) -> str:
        assert self._httpd is not None
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"
