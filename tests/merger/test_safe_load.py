"""Safe loading: safetensors validated, pickles refused unless allowed and then tensors-only."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from merger.errors import CorruptWeights, UnsafeFormat
from merger.safe_load import load_state_dict, open_weights

_SIDE_EFFECTS: list[str] = []


def _record(tag: str) -> str:
    _SIDE_EFFECTS.append(tag)
    return tag


class _Payload:
    """Unpickling this would call ``_record`` — a stand-in for arbitrary code in a hostile checkpoint."""

    def __reduce__(self):
        return (_record, ("executed",))


@pytest.fixture
def tensors() -> dict[str, torch.Tensor]:
    return {"a.weight": torch.arange(12, dtype=torch.float32).reshape(3, 4), "b.bias": torch.ones(5).half()}


def test_safetensors_lazy_read(tmp_path: Path, tensors) -> None:
    path = tmp_path / "m.safetensors"
    save_file(tensors, str(path), metadata={"k": "v"})
    with open_weights(path) as wf:
        assert sorted(wf.keys()) == ["a.weight", "b.bias"]
        assert wf.shape("a.weight") == (3, 4)
        assert wf.dtype_name("b.bias") == "F16"
        assert wf.metadata == {"k": "v"}
        assert torch.equal(wf.get("a.weight"), tensors["a.weight"])
    loaded = load_state_dict(path)
    assert all(torch.equal(loaded[k], tensors[k]) for k in tensors)


@pytest.mark.parametrize("name", ["m.ckpt", "m.pt", "m.bin", "disguised.safetensors"])
def test_pickle_refused_without_opt_in(tmp_path: Path, tensors, name: str) -> None:
    path = tmp_path / name
    torch.save(tensors, path)  # a zip-format torch pickle, whatever the file is called
    with pytest.raises(UnsafeFormat, match="pickle"):
        open_weights(path)


def test_pickle_allowed_loads_tensors_only(tmp_path: Path, tensors) -> None:
    path = tmp_path / "m.ckpt"
    torch.save({"state_dict": tensors, "global_step": 3}, path)
    loaded = load_state_dict(path, allow_pickle=True)
    assert sorted(loaded) == sorted(tensors)
    assert torch.equal(loaded["a.weight"], tensors["a.weight"])


@pytest.mark.parametrize("zip_format", [True, False])
def test_pickle_with_arbitrary_object_refused_even_when_allowed(tmp_path: Path, tensors, zip_format: bool) -> None:
    path = tmp_path / "evil.ckpt"
    payload = {"state_dict": tensors, "hook": _Payload()}
    if zip_format:
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload, protocol=2))
    _SIDE_EFFECTS.clear()
    with pytest.raises(UnsafeFormat, match="other than tensors"):
        load_state_dict(path, allow_pickle=True)
    assert _SIDE_EFFECTS == []


def test_truncated_safetensors_is_corrupt(tmp_path: Path, tensors) -> None:
    path = tmp_path / "m.safetensors"
    save_file(tensors, str(path))
    data = path.read_bytes()
    path.write_bytes(data[:-7])
    with pytest.raises(CorruptWeights, match="truncated"):
        open_weights(path)
    path.write_bytes(data[:20])  # cut inside the header
    with pytest.raises(CorruptWeights, match="m.safetensors"):
        open_weights(path)


def test_garbage_and_missing_files(tmp_path: Path) -> None:
    path = tmp_path / "junk.safetensors"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(CorruptWeights, match="malformed"):
        open_weights(path)
    with pytest.raises(FileNotFoundError):
        open_weights(tmp_path / "absent.safetensors")
