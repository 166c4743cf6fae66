"""Reading a LoRA file (the only I/O of this package): safe loading, then the pure normaliser."""

from __future__ import annotations

from pathlib import Path

from merger.errors import MergeError
from merger.lora.deltas import LoraDeltas
from merger.lora.formats import normalize_lora
from merger.safe_load import open_weights


def load_lora(path: Path | str, allow_pickle: bool = False, name: str | None = None) -> LoraDeltas:
    """Load a LoRA in any supported layout as per-module deltas in diffusers naming.

    Args:
        path (`Path`): a ``.safetensors`` LoRA (a pickle only with ``allow_pickle``).
        allow_pickle (`bool`, *optional*, defaults to `False`): permit ``torch.load(weights_only=True)``.
        name (`str`, *optional*): how errors name the expert (default: the file name).

    Raises:
        MergeError: missing file. UnsafeFormat: pickle refused. CorruptWeights: truncated/malformed file.
        UnsupportedLora: unknown layout or keys that cannot be applied.

    Example:
        >>> deltas = load_lora("pytorch_lora_weights.safetensors")
        >>> deltas.format, len(deltas)
        ('diffusers', 128)
    """
    path = Path(path)
    label = name or path.name
    if not path.is_file():
        raise MergeError(f"{label}: LoRA file not found: {path}")
    with open_weights(path, allow_pickle=allow_pickle) as wf:
        state_dict = {key: wf.get(key) for key in wf.keys()}
        metadata = dict(wf.metadata)
    config = path.parent / "adapter_config.json"
    if "lora_adapter_metadata" not in metadata and config.is_file() and config.stat().st_size < _MAX_CONFIG_BYTES:
        # PeftModel.save_pretrained keeps lora_alpha (and alpha_pattern, use_rslora) in this side file
        metadata["peft_adapter_config"] = config.read_text(encoding="utf-8", errors="replace")
    return normalize_lora(state_dict, metadata, label)


_MAX_CONFIG_BYTES = 1 << 20
