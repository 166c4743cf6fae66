"""The one safetensors header parser: read and check a file's header without loading a tensor.

Shared by the downloader (``crawler.downloads.validate_safetensors``, strict: every dtype known, tensors
may not overlap) and the loaders (``merger.safe_load.read_header``). Each raises its own ``CorruptWeights``
with the file's name in front of the ``HeaderError`` reason given here.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Any

MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors itself refuses larger headers
ITEM_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4,
    "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "C64": 8,
}


class HeaderError(ValueError):
    """A safetensors header is malformed or does not fit its file (the reason, without the file name)."""


def read_header(path: Path, strict: bool = False) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """``({name: {dtype, shape, data_offsets}}, metadata)`` of a safetensors file, checked against its size.

    Every file: an 8-byte little-endian header length within the file, a JSON object, string-to-string
    ``__metadata__``, per tensor a string dtype, a shape of non-negative ints and ``data_offsets`` inside the
    data section sized ``prod(shape) * itemsize`` (for known dtypes). ``strict`` also refuses unknown dtypes
    and overlapping tensors. Raises ``HeaderError``.
    """
    size = path.stat().st_size
    with path.open("rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise HeaderError(f"not a safetensors file ({size} bytes, no header)")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER_BYTES or 8 + n > size:
            raise HeaderError(f"truncated or not a safetensors file (header claims {n} bytes, file has {size})")
        raw = fh.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise HeaderError(f"malformed safetensors header (not JSON: {exc.__class__.__name__})") from None
    if not isinstance(header, dict):
        raise HeaderError("malformed safetensors header (not an object)")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise HeaderError("malformed safetensors header (__metadata__ must map strings to strings)")
    data_bytes = size - 8 - n
    spans: list[tuple[int, int, str]] = []
    for name, info in header.items():
        try:
            dtype, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
            ok = (isinstance(dtype, str) and isinstance(shape, list) and isinstance(begin, int)
                  and isinstance(end, int) and 0 <= begin <= end and all(isinstance(d, int) and d >= 0 for d in shape))
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise HeaderError(f"malformed safetensors header entry for {name!r}")
        item = ITEM_BYTES.get(dtype)
        if item is None and strict:
            raise HeaderError(f"tensor {name!r} has unknown dtype {dtype!r}")
        if end > data_bytes:
            raise HeaderError(f"truncated: tensor {name!r} has offsets past the end of the data section "
                              f"(byte {end} of {data_bytes})")
        if item is not None and math.prod(shape) * item != end - begin:
            raise HeaderError(f"tensor {name!r} size {end - begin} bytes does not match its shape and dtype "
                              f"({math.prod(shape) * item} bytes)")
        spans.append((begin, end, name))
    if strict:
        spans.sort()
        for (_, end, a), (begin, _, b) in zip(spans, spans[1:], strict=False):
            if begin < end:
                raise HeaderError(f"tensors {a!r} and {b!r} overlap")
    return header, dict(metadata)
