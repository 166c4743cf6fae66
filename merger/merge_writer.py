"""Writing a safetensors file tensor by tensor: the header (with every offset) first, then the data in order,
so a merge never holds more than the tensors in flight."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, BinaryIO

from merger.errors import MergeError

if TYPE_CHECKING:
    import torch

ITEM_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
              "F8_E4M3": 1, "F8_E5M2": 1}
DTYPE_NAMES = {"fp32": "F32", "fp16": "F16", "bf16": "BF16"}


def safetensors_dtype(tensor: torch.Tensor) -> str:
    import torch

    names = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
             torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
             torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2"}
    try:
        return names[tensor.dtype]
    except KeyError:
        raise MergeError(f"cannot write tensors of dtype {tensor.dtype}") from None


def torch_dtype(name: str) -> torch.dtype:
    """``fp16``/``fp32``/``bf16`` or a safetensors dtype name → the torch dtype."""
    import torch

    table = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
             "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
             "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
    return table[DTYPE_NAMES.get(name, name)]


class StreamingSafetensorsWriter:
    """Writes ``entries`` (name, safetensors dtype, shape) to ``path`` in the given order.

    The file appears atomically at ``path`` on a clean ``close()``; on error the partial file is removed.
    """

    def __init__(self, path: Path, entries: list[tuple[str, str, tuple[int, ...]]],
                 metadata: dict[str, str] | None = None) -> None:
        self.path = Path(path)
        self._partial = self.path.with_name(f".{self.path.name}.partial-{os.getpid()}")
        self._order = [name for name, _, _ in entries]
        self._sizes: dict[str, int] = {}
        header: dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
        offset = 0
        for name, dtype, shape in entries:
            size = math.prod(shape) * ITEM_BYTES[dtype]
            header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
            self._sizes[name] = size
            offset += size
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned, as safetensors writes it
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh: BinaryIO | None = self._partial.open("wb")
        self._fh.write(len(raw).to_bytes(8, "little"))
        self._fh.write(raw)
        self._next = 0

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append the next tensor; it must be the next name in order, with the declared dtype and shape."""
        import torch

        assert self._fh is not None
        if self._next >= len(self._order) or self._order[self._next] != name:
            raise MergeError(f"internal: tensor {name!r} written out of order")
        data = tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
        if data.nbytes != self._sizes[name]:
            raise MergeError(f"internal: tensor {name!r} has {data.nbytes} bytes, header says {self._sizes[name]}")
        self._fh.write(memoryview(data))
        self._next += 1

    def close(self) -> Path:
        if self._fh is None:
            return self.path
        fh, self._fh = self._fh, None
        fh.close()
        if self._next != len(self._order):
            self._partial.unlink(missing_ok=True)
            raise MergeError(f"internal: only {self._next} of {len(self._order)} tensors written")
        os.replace(self._partial, self.path)
        return self.path

    def abort(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        self._partial.unlink(missing_ok=True)

    def __enter__(self) -> StreamingSafetensorsWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    """Save a whole state dict with sorted keys and metadata, so equal inputs give byte-identical files
    (``safetensors.save_file`` orders metadata by a randomised hash map)."""
    names = sorted(tensors)
    entries = [(n, safetensors_dtype(tensors[n]), tuple(tensors[n].shape)) for n in names]
    with StreamingSafetensorsWriter(path, entries, dict(sorted((metadata or {}).items()))) as writer:
        for name in names:
            writer.write(name, tensors[name])
    return Path(path)
