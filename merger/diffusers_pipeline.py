"""Building diffusers pipelines for a merge plan, keeping the built ones in an in-memory LRU, and applying
weighted LoRAs to them without corrupting the cached copy.

Base weights are a diffusers directory or a single original-layout ``.safetensors``; a single file is
loaded with ``from_single_file(config=<local diffusers dir>)`` and never touches the network. Checkpoint
experts are merged first by :func:`merger.merge.cached_merge` (cached on disk); the LRU key is that
merge's content hash (or the base's identity when there is nothing to merge) plus device and dtype.

LoRA application (:func:`choose_lora_mode`, policy set per :class:`merger.generate.Generator`):

* ``fuse`` (the default policy) — ``W ← W + Σ wᵢ·scaleᵢ·ΔWᵢ`` computed by :mod:`merger.lora`, the touched
  weights saved and copied back bit-exactly after sampling. Exact, no extra compute per denoising step,
  and the same plan and seed give the same pixels whatever the cached pipeline served before.
* ``adapters`` — diffusers ``load_lora_weights`` + ``set_adapters(names, weights)``: each LoRA file is
  loaded once per pipeline and switching sets is one ``set_adapters`` call. For long-lived workers that
  switch between many LoRA sets on one base (``benchmarks/merge_lora.py`` measures both per switch).
  Adapter outputs differ from fused ones by float rounding (≤ 2/255 per pixel on the tiny zoo).
* ``auto`` — ``fuse`` for a pipeline's first LoRA set, ``adapters`` once it is reused with another set.

Under every policy LoHa/LoKr/Tucker updates are fused: peft LoRA adapters cannot hold them.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from merger.errors import MergeError
from merger.lora import LoraDeltas, check_fits, convert_deltas_to_peft, fuse_loras, load_lora, restore_weights

if TYPE_CHECKING:
    import torch

    from core.settings import Settings

#: How many built pipelines stay in memory (each is a whole model on its device).
PIPELINE_CACHE_SIZE = 2
#: How many normalised LoRA files stay in memory.
LORA_CACHE_SIZE = 16
#: How many peft adapters one cached pipeline keeps loaded (least recently used ones are deleted).
MAX_ADAPTERS = 16
LoraMode = Literal["fuse", "adapters", "auto"]
_TORCH_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


@dataclass(frozen=True)
class BaseModel:
    """Where a plan's base weights are: ``path`` (dir or file) and a diffusers ``config_dir`` for it."""

    path: Path
    config_dir: Path
    family: str

    @property
    def is_single_file(self) -> bool:
        return self.path.is_file()


def resolve_base(settings: Settings, base_model: str, family: str) -> BaseModel:
    """The base weights for a plan: ``base_model`` if set, else ``settings.base_models[family]``.

    A single file needs a local diffusers directory for its configs and tokenizer: a sibling directory with
    the same stem (``sd15.safetensors`` → ``sd15/``), else ``<data_dir>/configs/<family>/``.

    Raises:
        MergeError: no base configured, a missing path, or no config directory for a single file.
    """
    raw = base_model or settings.base_models.get(family, "")
    if not raw:
        raise MergeError(f"no base model for family {family!r}: set the plan's base_model or "
                         f"DIFFGRAPH_BASE_MODELS='{{\"{family}\": \"/path/to/base\"}}'")
    path = Path(raw).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise MergeError(f"base model {path} is a directory without model_index.json (not a diffusers pipeline)")
        return BaseModel(path, path, family)
    if not path.is_file():
        raise MergeError(f"base model not found: {path}")
    candidates = [path.with_suffix(""), Path(settings.data_dir) / "configs" / family]
    for candidate in candidates:
        if (candidate / "model_index.json").is_file():
            return BaseModel(path, candidate, family)
    raise MergeError(f"base model {path.name} is a single file and no local diffusers config was found "
                     f"(looked in {', '.join(str(c) for c in candidates)})")


def torch_dtype(name: str) -> torch.dtype:
    import torch

    return getattr(torch, _TORCH_DTYPES[name])


@contextmanager
def _quiet() -> Iterator[None]:
    """Silence diffusers/transformers load reports and progress bars (they report every peft-wrapped key
    as 'missing' and draw bars on stderr of workers)."""
    import diffusers.utils.logging as dlog
    import transformers.utils.logging as tlog

    loggers = [logging.getLogger(n) for n in ("diffusers", "transformers", "peft")]
    levels = [lg.level for lg in loggers]
    bars = (dlog.is_progress_bar_enabled(), tlog.is_progress_bar_enabled())
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    dlog.disable_progress_bar()
    tlog.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*peft_config.*")
            warnings.filterwarnings("ignore", category=FutureWarning)
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)
        if bars[0]:
            dlog.enable_progress_bar()
        if bars[1]:
            tlog.enable_progress_bar()


def load_pipeline(weights: Path, config_dir: Path, family: str, device: str, dtype: str) -> Any:
    """Load a diffusers pipeline from a diffusers dir or an original-layout single file (offline)."""
    import diffusers

    from merger.families import get_family

    cls = getattr(diffusers, get_family(family).pipeline_class)
    kwargs: dict[str, Any] = {"dtype": torch_dtype(dtype), "local_files_only": True}
    if family in ("sd15", "sd2"):
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    try:
        with _quiet():
            if weights.is_dir():
                pipe = cls.from_pretrained(str(weights), **kwargs)
            else:
                pipe = cls.from_single_file(str(weights), config=str(config_dir), **kwargs)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise MergeError(f"cannot load {weights.name} as a {family} pipeline: {str(exc).splitlines()[0][:300]}") from None
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


@dataclass
class CachedPipeline:
    """A built pipeline and what this process did to it (loaded adapters, LoRA sets served)."""

    pipe: Any
    key: tuple[str, ...]
    adapters: dict[str, str] = field(default_factory=dict)  # LoRA identity → adapter name
    lora_sets: set[tuple[tuple[str, float], ...]] = field(default_factory=set)

    def components(self) -> torch.nn.ModuleDict:
        """The weight-bearing components as one module whose parameter names match LoRA targets."""
        import torch

        names = [n for n in ("unet", "transformer", "text_encoder", "text_encoder_2")
                 if isinstance(getattr(self.pipe, n, None), torch.nn.Module)]
        return torch.nn.ModuleDict({n: getattr(self.pipe, n) for n in names})


class PipelineCache:
    """An in-memory LRU of built pipelines; ``builds`` counts the misses (real loads)."""

    def __init__(self, maxsize: int = PIPELINE_CACHE_SIZE) -> None:
        self.maxsize = max(1, maxsize)
        self.builds = 0
        self._entries: OrderedDict[tuple[str, ...], CachedPipeline] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple[str, ...], build: Callable[[], Any]) -> tuple[CachedPipeline, bool]:
        """The cached pipeline for ``key`` (hit=True) or a newly built one, evicting the least recent."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
                return entry, True
        pipe = build()
        with self._lock:
            entry = CachedPipeline(pipe, key)
            self._entries[key] = entry
            self.builds += 1
            while len(self._entries) > self.maxsize:
                self._entries.popitem(last=False)
        return entry, False

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


def file_identity(path: Path) -> str:
    """A cheap identity of a local file or directory: resolved path, size and mtime."""
    path = Path(path).resolve()
    stat = path.stat()
    return f"{path}:{stat.st_size}:{stat.st_mtime_ns}"


class LoraCache:
    """Normalised LoRA files by file identity (re-read when the file changes)."""

    def __init__(self, maxsize: int = LORA_CACHE_SIZE) -> None:
        self.maxsize = maxsize
        self._entries: OrderedDict[str, LoraDeltas] = OrderedDict()

    def load(self, path: Path, name: str, allow_pickle: bool) -> tuple[str, LoraDeltas]:
        ident = file_identity(path)
        deltas = self._entries.get(ident)
        if deltas is None:
            deltas = load_lora(path, allow_pickle=allow_pickle, name=name)
            self._entries[ident] = deltas
            while len(self._entries) > self.maxsize:
                self._entries.popitem(last=False)
        else:
            self._entries.move_to_end(ident)
        return ident, deltas


def choose_lora_mode(entry: CachedPipeline, loras: Sequence[tuple[str, LoraDeltas, float]],
                     requested: LoraMode = "fuse") -> Literal["none", "fuse", "adapters"]:
    """Apply ``loras`` by fusing or as peft adapters under policy ``requested`` (see the module docstring)."""
    if not loras:
        return "none"
    if not all(d.is_low_rank for _, d, _ in loras):
        return "fuse"
    if requested != "auto":
        return requested
    reused = bool(entry.lora_sets - {_lora_set(loras)})
    return "adapters" if (entry.adapters or reused) else "fuse"


def _lora_set(loras: Sequence[tuple[str, LoraDeltas, float]]) -> tuple[tuple[str, float], ...]:
    return tuple(sorted((ident, w) for ident, _, w in loras))


def _adapter_name(ident: str) -> str:
    return "lora_" + hashlib.sha1(ident.encode()).hexdigest()[:12]


@contextmanager
def applied_loras(entry: CachedPipeline, loras: Sequence[tuple[str, LoraDeltas, float]],
                  mode: LoraMode = "fuse") -> Iterator[str]:
    """Apply weighted LoRAs to a cached pipeline for the length of the block; yields the mode used.

    Fused weights are restored bit-exactly on exit; adapters stay loaded (disabled when not in use) so a
    later switch only calls ``set_adapters``.
    """
    chosen = choose_lora_mode(entry, loras, mode)
    pipe = entry.pipe
    if loras and len(entry.lora_sets) < 1024:  # only "served another set before?" is ever asked
        entry.lora_sets.add(_lora_set(loras))
    if chosen != "adapters" and entry.adapters:
        pipe.disable_lora()
    if chosen == "none":
        yield chosen
        return
    if chosen == "fuse":
        module = entry.components()
        originals = fuse_loras(module, [(d, w) for _, d, w in loras])
        try:
            yield chosen
        finally:
            restore_weights(module, originals)
        return
    module = entry.components()
    check_fits({k: p.shape for k, p in module.named_parameters()}, [(d, w) for _, d, w in loras])
    wanted = {ident for ident, _, _ in loras}
    stale = [i for i in entry.adapters if i not in wanted][: max(0, len(entry.adapters) + len(loras) - MAX_ADAPTERS)]
    if stale:
        pipe.delete_adapters([entry.adapters.pop(i) for i in stale])
    names = []
    for ident, deltas, _ in loras:
        name = entry.adapters.pop(ident, None)
        if name is None:
            name = _adapter_name(ident)
            with _quiet():
                pipe.load_lora_weights(convert_deltas_to_peft(deltas), adapter_name=name)
        entry.adapters[ident] = name  # re-inserted: dict order is least → most recently used
        names.append(name)
    pipe.enable_lora()
    pipe.set_adapters(names, [float(w) for _, _, w in loras])
    yield chosen
