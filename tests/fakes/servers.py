"""Fixture servers speaking the real Civitai and Hugging Face API shapes, with failure injection (tests).

The Civitai one is the demo's loopback server (``deploy/demo_server.py``) plus what tests need: every
request is recorded (``.requests``) and failures can be injected (``.fail(match, *actions)``) so retries,
broken pages and interrupted downloads can be exercised offline:

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
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

from deploy.demo_server import RANGE, CivitaiServer, LoopbackServer

Action = str | tuple[Any, ...]


class _Faults(LoopbackServer):
    """Request log and failure injection on top of a ``LoopbackServer``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.requests: list[str] = []
        self.range_requests: list[tuple[str, str]] = []  # (path, Range header) of resumed downloads
        self._failures: list[tuple[str, deque[Action]]] = []
        self._lock = threading.Lock()
        self._resume = threading.Event()

    def stop(self) -> None:
        self._resume.set()  # let a stalled download finish
        super().stop()

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

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        with self._lock:
            self.requests.append(h.path)
        action = self._next_failure(h.path)
        if isinstance(action, tuple) and action[0] == "status":
            code, retry_after = action[1], action[2] if len(action) > 2 else None
            headers = {"Retry-After": str(retry_after)} if retry_after is not None else {}
            self._send(h, code, json.dumps({"error": f"injected {code}"}).encode(), headers=headers)
            return
        result = self._route(h)
        if result is None:
            return
        status, body, headers = result
        if action == "truncated":
            body = body[: max(1, len(body) // 2)]
        self._send(h, status, body, headers=headers)

    def _send_file(self, h: BaseHTTPRequestHandler, path: Path | None, target: str) -> None:
        if path is not None and path.is_file() and RANGE.match(h.headers.get("Range", "") or ""):
            with self._lock:
                self.range_requests.append((h.path, h.headers["Range"]))
        super()._send_file(h, path, target)

    def _write_body(self, h: BaseHTTPRequestHandler, chunk: bytes, target: str) -> None:
        action = self._next_failure(target + "#drop")
        if action == "drop":  # half the body, then the connection closes
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
        super()._write_body(h, chunk, target)

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


class CivitaiFixtureServer(_Faults, CivitaiServer):
    """The demo's Civitai server (``deploy.demo_server.CivitaiServer``) with request log and failures."""

    def __enter__(self) -> CivitaiFixtureServer:
        self.start()
        return self


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


class HFFixtureServer(_Faults):
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

