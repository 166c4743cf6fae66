"""Streaming checkpoint merges: ``weighted_average``, ``task_arithmetic``, ``ties`` and ``dare``.

Every output tensor is computed from the base's and each expert's tensor of the same name (aligned across
key layouts by :mod:`merger.model_source`), in fp32, then cast to the target dtype and appended to the output
file, so peak memory is a few tensors, not N models. Inputs are read with ``safe_open(backend="pread")``
where supported, which keeps their file pages out of RSS. The output's ``__metadata__`` carries the recipe.

The merge formulas (per tensor, θ_b the base, θ_i expert i with weight w_i, τ_i = θ_i − θ_b):

* ``weighted_average``: θ = (1 − Σw)·θ_b + Σ w_i θ_i when Σw < 1 (one expert at 0.3 blends 30 % of it into
  the base), else Σ (w_i / Σw) θ_i (a model soup).
* ``task_arithmetic``: θ = θ_b + Σ w_i τ_i.
* ``ties``: trim each τ_i to its top-``density`` fraction by magnitude (τ̂_i), elect the sign
  γ = sgn(Σ w_i τ̂_i), then θ = θ_b + Σ_i w_i τ̂_i [sgn τ̂_i = γ] / Σ_i w_i [sgn τ̂_i = γ, τ̂_i ≠ 0]: the
  disjoint mean weighted as in mergekit's ``ties`` (normalize=True) and sd-mecha's ``ties_sum``, so experts
  whose weights sum to 1 are not scaled down by 1/n.
* ``dare``: drop each τ_i element with probability p = 1 − ``density`` (seeded per expert and tensor name),
  rescale the survivors by 1/(1 − p), then add as in task arithmetic.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

from core.content_store import sha256_of
from merger.errors import MergeError
from merger.merge_cache import MergeCache
from merger.merge_loras import TensorHook, lora_fusion_hook
from merger.merge_writer import (
    DTYPE_NAMES,
    ITEM_BYTES,
    StreamingSafetensorsWriter,
    safetensors_dtype,
    torch_dtype,
)
from merger.model_source import ModelSource, TensorRef, align, ldm_names_for, open_source
from merger.recipe import MERGE_METHODS, METADATA_KEY, MergeRecipe

if TYPE_CHECKING:
    import torch

    from core.settings import Settings
    from merger.lora import LoraDeltas

METHODS = MERGE_METHODS
Progress = Callable[[int, int], None]
_WORKERS = max(1, min(4, os.cpu_count() or 1))
_INFLIGHT_BYTES = 256 * 1024 * 1024
_SLICE_ELEMENTS = 1 << 21


# ---------------------------------------------------------------- the formulas (pure, fp32 tensors in)

def weighted_average(base: torch.Tensor, experts: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    total = sum(weights)
    import torch

    if total < 1.0:
        out = base * (1.0 - total)
        pairs = zip(weights, experts, strict=True)
    else:
        out = experts[0] * (weights[0] / total)
        pairs = ((w / total, x) for w, x in zip(weights[1:], experts[1:], strict=True))
    for w, x in pairs:
        out += torch.mul(x, w)
    return out


def task_arithmetic(base: torch.Tensor, experts: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    import torch

    out = base.clone()
    for w, x in zip(weights, experts, strict=True):
        # out += w * (x - base), with one temporary instead of two (same roundings, same bits)
        delta = torch.sub(x, base)
        out += delta.mul_(w)
    return out


def trim_top_k(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ``ceil(density · numel)`` largest-magnitude entries of ``delta``, zero the rest."""
    import torch

    n = delta.numel()
    k = min(n, math.ceil(density * n))
    if k >= n:
        return delta.clone()
    if k <= 0:
        return torch.zeros_like(delta)
    flat = delta.reshape(-1)
    keep = torch.zeros(n, dtype=torch.bool)
    keep[flat.abs().topk(k, sorted=False).indices] = True
    return torch.where(keep, flat, torch.zeros_like(flat)).reshape(delta.shape)


def ties(base: torch.Tensor, experts: list[torch.Tensor], weights: list[float], density: float) -> torch.Tensor:
    import torch

    trimmed = [w * trim_top_k(x - base, density) for w, x in zip(weights, experts, strict=True)]
    stacked = torch.stack(trimmed)
    elected = torch.sign(stacked.sum(dim=0))
    agree = (torch.sign(stacked) == elected) & (stacked != 0)
    # Divide by the summed weight of the agreeing experts, not their count (mergekit, sd-mecha); where no
    # expert agrees (or weights cancel) the delta is 0, so divide by 1 there as mergekit does.
    w = torch.tensor(weights, dtype=stacked.dtype).reshape(-1, *([1] * (stacked.dim() - 1)))
    divisor = (w * agree).sum(dim=0)
    divisor = torch.where(divisor.abs() < 1e-8, torch.ones_like(divisor), divisor)
    return base + (stacked * agree).sum(dim=0) / divisor


def dare_keep_mask(seed: int, index: int, key: str, shape: tuple[int, ...], density: float) -> torch.Tensor:
    """The seeded keep-mask DARE uses for expert ``index`` at tensor ``key`` (independent of merge order)."""
    import torch

    digest = hashlib.sha256(f"{seed}:{index}:{key}".encode()).digest()
    gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
    return torch.rand(shape, generator=gen) < density


def dare(base: torch.Tensor, experts: list[torch.Tensor], weights: list[float], density: float, seed: int,
         key: str, masks: list[torch.Tensor] | None = None) -> torch.Tensor:
    """DARE; ``masks`` (one keep-mask per expert) replace the seeded ones when merging a tensor in slices."""
    if not 0.0 < density <= 1.0:
        raise MergeError(f"dare needs 0 < density <= 1, got {density}")
    out = base.clone()
    for i, (w, x) in enumerate(zip(weights, experts, strict=True)):
        keep = masks[i] if masks is not None else dare_keep_mask(seed, i, key, tuple(base.shape), density)
        out += (w / density) * ((x - base) * keep)
    return out


def merge_tensor(method: str, base: torch.Tensor, experts: list[torch.Tensor], weights: list[float],
                 density: float = 0.5, seed: int = 0, key: str = "",
                 masks: list[torch.Tensor] | None = None) -> torch.Tensor:
    """One merged tensor by ``method`` (fp32 in, fp32 out). ``key`` seeds DARE's masks (or pass ``masks``)."""
    if method == "weighted_average":
        return weighted_average(base, experts, weights)
    if method == "task_arithmetic":
        return task_arithmetic(base, experts, weights)
    if method == "ties":
        return ties(base, experts, weights, density)
    if method == "dare":
        return dare(base, experts, weights, density, seed, key, masks)
    raise MergeError(f"unknown merge method {method!r} (choose from {', '.join(METHODS)})")


def validate(method: str, weights: list[float], density: float, dtype: str) -> None:
    if method not in METHODS:
        raise MergeError(f"unknown merge method {method!r} (choose from {', '.join(METHODS)})")
    if dtype not in DTYPE_NAMES:
        raise MergeError(f"unknown dtype {dtype!r} (choose from {', '.join(DTYPE_NAMES)})")
    if not 0.0 < density <= 1.0:
        raise MergeError(f"density must be in (0, 1], got {density}")
    if any(not math.isfinite(w) for w in weights):
        raise MergeError("checkpoint weights must be finite numbers")
    if method == "weighted_average" and any(w < 0 for w in weights):
        raise MergeError("weighted_average needs non-negative weights")


# ---------------------------------------------------------------- streaming execution

def merge(recipe: MergeRecipe, out: Path, progress: Progress | None = None, *, allow_pickle: bool = False,
          provenance: dict[str, Any] | None = None, loras: Sequence[tuple[LoraDeltas, float]] = (),
          link_unchanged: bool = False) -> Path:
    """Execute ``recipe``: merge its checkpoint experts into its base tensor by tensor and write ``out``.

    Args:
        recipe (`MergeRecipe`): base (single-file checkpoint or diffusers directory), experts (either
            layout, same family) with weights, merge method, density, seed, dtype (fp32 accumulation).
        out (`Path`): a ``.safetensors`` file (original single-file layout), or — for a diffusers base —
            a directory, which becomes a complete diffusers pipeline directory.
        progress (`Callable[[int, int], None]`, *optional*): called with (tensors done, total).
        allow_pickle (`bool`): let pickled inputs be read with ``torch.load(weights_only=True)``.
        provenance (`dict`, *optional*): extra fields stored in the output's ``diffgraph_recipe`` metadata.
        loras (`list[tuple[LoraDeltas, float]]`, *optional*): LoRAs (from ``merger.lora.load_lora``) fused
            into the merged weights with these strengths, in the same pass, before the cast.
        link_unchanged (`bool`, *optional*): a diffusers-directory output symlinks the base's files it does
            not rewrite instead of copying them (the on-disk merge cache).

    Returns:
        `Path`: ``out``. Its ``__metadata__`` carries ``recipe.to_json()`` under ``diffgraph.recipe`` and a
        provenance summary (input names, LoRAs, ``provenance``) under ``diffgraph_recipe``.

    Raises:
        MergeError, IncompatibleExpert, UnsafeFormat, CorruptWeights, FileNotFoundError.
    """
    method, dtype, density, seed = recipe.merge_method, recipe.dtype, recipe.density, recipe.seed
    weights = [w for _, w in recipe.experts]
    validate(method, weights, density, dtype)
    if not recipe.experts and not loras:
        raise MergeError("nothing to merge: give at least one checkpoint or LoRA")
    out = Path(out)
    with open_source(Path(recipe.base), allow_pickle=allow_pickle, family=recipe.family) as src:
        sources: list[ModelSource] = []
        try:
            for path, _ in recipe.experts:
                sources.append(open_source(Path(path), allow_pickle=allow_pickle, family=src.family.name))
            aligned = [align(src, expert) for expert in sources]
            hook = lora_fusion_hook(src, loras) if loras else None
            summary = {
                "tool": "diffgraph", "method": method, "dtype": dtype, "density": density, "seed": seed,
                "family": src.family.name, "base": src.name,
                "experts": [{"name": s.name, "weight": w} for s, w in zip(sources, weights, strict=True)],
                "loras": [{"name": lora.name, "format": lora.format, "weight": float(w)} for lora, w in loras],
                **(provenance or {}),
            }
            metadata = {"format": "pt", "diffgraph_recipe": json.dumps(summary, sort_keys=True),
                        METADATA_KEY: recipe.to_json()}
            job = _MergeJob(src, aligned, weights, method, density, seed, torch_dtype(dtype), hook)
            if out.suffix == ".safetensors":
                job.write_single_file(out, metadata, progress)
            elif src.layout == "diffusers":
                job.write_diffusers_dir(out, metadata, progress, link_unchanged)
            else:
                raise MergeError(f"{out}: a single-file base is written as one .safetensors file")
        finally:
            for s in sources:
                s.close()
    return out


def merge_checkpoints(base: Path, experts: list[tuple[Path, float]], method: str = "task_arithmetic",
                      out: Path = Path("merged.safetensors"), dtype: str = "fp16", density: float = 0.5,
                      seed: int = 0, progress: Progress | None = None, *, allow_pickle: bool = False,
                      provenance: dict[str, Any] | None = None,
                      loras: Sequence[tuple[LoraDeltas, float]] = (), family: str | None = None,
                      link_unchanged: bool = False) -> Path:
    """:func:`merge` with the recipe spelled out as arguments (the pre-recipe call, kept for scripts)."""
    recipe = MergeRecipe(str(base), tuple((str(p), float(w)) for p, w in experts), method, density, seed, dtype,
                         family)
    return merge(recipe, out, progress, allow_pickle=allow_pickle, provenance=provenance, loras=loras,
                 link_unchanged=link_unchanged)


class _MergeJob:
    def __init__(self, base: ModelSource, aligned: list[dict[str, TensorRef]], weights: list[float], method: str,
                 density: float, seed: int, target: torch.dtype, hook: TensorHook | None) -> None:
        self.base, self.aligned, self.weights = base, aligned, weights
        self.method, self.density, self.seed, self.target, self.hook = method, density, seed, target, hook
        import torch

        self._empty_target = torch.empty(0, dtype=target)

    def _merged(self, native: str) -> bool:
        return self.base.component_of(native) is not None and self.base.ref(native).file.dtype_name(
            self.base.ref(native).key).startswith(("F", "BF", "float", "bfloat"))

    def _stored_dtype(self, native: str) -> str:
        ref = self.base.ref(native)
        name = ref.file.dtype_name(ref.key)
        return name if name.isupper() else safetensors_dtype(ref.load())

    def compute(self, native: str) -> torch.Tensor:
        import torch

        base_tensor = self.base.ref(native).load()
        if not self._merged(native):
            return base_tensor
        experts = [a[native].load() for a in self.aligned]
        rows = self._slice_rows(base_tensor)
        if rows is None:
            merged = self._merge(native, base_tensor, experts)
            return (self.hook(native, merged) if self.hook is not None else merged).to(self.target)
        # Element-wise methods run slice by slice into the output: a large tensor then never has fp32
        # copies of every input alive at once (SD1.5's largest tensor has 29.5M elements).
        masks = None
        if self.method == "dare":
            masks = [dare_keep_mask(self.seed, i, native, tuple(base_tensor.shape), self.density)
                     for i in range(len(experts))]
        out = torch.empty(base_tensor.shape, dtype=self.target)
        for start in range(0, base_tensor.shape[0], rows):
            part = slice(start, start + rows)
            out[part] = self._merge(native, base_tensor[part], [x[part] for x in experts],
                                    [m[part] for m in masks] if masks is not None else None)
        return out

    def _slice_rows(self, base_tensor: torch.Tensor) -> int | None:
        """Rows per slice for a large tensor of an element-wise method; None to merge it whole."""
        if (self.method == "ties" or self.hook is not None or base_tensor.dim() == 0
                or base_tensor.numel() <= _SLICE_ELEMENTS or base_tensor.shape[0] < 2):
            return None
        return max(1, _SLICE_ELEMENTS // (base_tensor.numel() // base_tensor.shape[0]))

    def _merge(self, native: str, base_tensor: torch.Tensor, experts: list[torch.Tensor],
               masks: list[torch.Tensor] | None = None) -> torch.Tensor:
        base32 = base_tensor.float()
        if not experts:
            return base32
        # The delta methods subtract the fp32 base first, so type promotion computes them in fp32 without an
        # upcast copy of each expert; weighted_average scales experts directly and needs fp32 copies.
        # fp8 storage (FLUX fp8 files) has no type promotion at all: upcast it too.
        experts = [x.float() if self.method == "weighted_average" or x.dtype.itemsize == 1 else x for x in experts]
        return merge_tensor(self.method, base32, experts, self.weights, self.density, self.seed, native, masks)

    def _entries(self, natives: list[str], names: dict[str, tuple[str, bool]]) -> list[tuple[str, str, tuple]]:
        target = safetensors_dtype(self._empty_target)
        entries = []
        for native in natives:
            name, conv = names[native]
            shape = tuple(self.base.ref(native).shape())
            if conv and len(shape) == 2:
                shape = (*shape, 1, 1)
            entries.append((name, target if self._merged(native) else self._stored_dtype(native), shape))
        return entries

    def _cost(self, native: str) -> int:
        """Bytes a tensor's computation holds: the inputs as stored plus, when merged whole, fp32 copies of
        the base, the result and a temporary (a sliced merge holds the output instead)."""
        ref = self.base.ref(native)
        n = math.prod(ref.shape())
        item = ITEM_BYTES.get(ref.file.dtype_name(ref.key), 4)
        inputs = n * item * (len(self.aligned) + 1)
        whole = self.method == "ties" or self.hook is not None or n <= _SLICE_ELEMENTS
        return inputs + (n * 4 * (len(self.aligned) + 3) if whole else n * 4)

    def _stream(self, writer: StreamingSafetensorsWriter, natives: list[str], names: dict[str, tuple[str, bool]],
                progress: Progress | None, done: int, total: int) -> int:
        """Compute tensors on a small thread pool (torch and pread release the GIL) and write them in order.

        The tensors in flight are bounded by bytes (``_INFLIGHT_BYTES``), not by count: SD1.5's largest
        tensors are 100× its median ones.
        """
        pending: deque[tuple[str, int, Future]] = deque()
        inflight = 0
        queue = deque(natives)
        with ThreadPoolExecutor(_WORKERS, thread_name_prefix="merge") as pool:
            while queue or pending:
                while queue and (not pending or inflight + self._cost(queue[0]) <= _INFLIGHT_BYTES):
                    native = queue.popleft()
                    cost = self._cost(native)
                    inflight += cost
                    pending.append((native, cost, pool.submit(self.compute, native)))
                native, cost, fut = pending.popleft()
                tensor = fut.result()
                inflight -= cost
                name, conv = names[native]
                if conv and tensor.dim() == 2:
                    tensor = tensor[:, :, None, None]
                writer.write(name, tensor)
                del tensor
                done += 1
                if progress is not None:
                    progress(done, total)
        return done

    def write_single_file(self, out: Path, metadata: dict[str, str], progress: Progress | None) -> None:
        natives = self.base.native_keys()
        if self.base.layout == "single_file":
            names = {k: (k, False) for k in natives}
        else:  # a diffusers base written as one original-layout file
            names = ldm_names_for(self.base)
            natives = [k for k in natives if k in names]
        natives.sort(key=lambda k: names[k][0])
        with StreamingSafetensorsWriter(out, self._entries(natives, names), metadata) as writer:
            self._stream(writer, natives, names, progress, 0, len(natives))

    def write_diffusers_dir(self, out: Path, metadata: dict[str, str], progress: Progress | None,
                            link_unchanged: bool = False) -> None:
        src_dir = self.base.path
        partial = out.with_name(f".{out.name}.partial-{os.getpid()}")
        shutil.rmtree(partial, ignore_errors=True)
        merged_dirs = {wf.path.parent.resolve() for wf in self.base.files.values()}

        def skip(folder: str, names: list[str]) -> list[str]:
            # the merged components' weights (and their stale variants) are rewritten below
            if Path(folder).resolve() not in merged_dirs:
                return []
            return [n for n in names if n.endswith((".safetensors", ".bin", ".safetensors.index.json"))]

        def link(src: str, dst: str) -> None:
            os.symlink(os.path.abspath(src), dst)

        shutil.copytree(src_dir, partial, ignore=skip, copy_function=link if link_unchanged else shutil.copy2)
        try:
            total = len(self.base.native_keys())
            done = 0
            for component, wf in self.base.files.items():
                natives = sorted(f"{component}/{k}" for k in wf.keys())
                names = {k: (k.split("/", 1)[1], False) for k in natives}
                target = partial / component / wf.path.name
                with StreamingSafetensorsWriter(target, self._entries(natives, names), metadata) as writer:
                    done = self._stream(writer, natives, names, progress, done, total)
            if out.exists():
                shutil.rmtree(out)
            os.replace(partial, out)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise


# ---------------------------------------------------------------- the on-disk cache

def file_sha256(path: Path, cache_file: Path | None = None) -> str:
    """SHA-256 of a file, remembered in ``cache_file`` by (path, size, mtime) so big files hash once."""
    path = Path(path).resolve()
    stat = path.stat()
    token = f"{path}:{stat.st_size}:{stat.st_mtime_ns}"
    known: dict[str, str] = {}
    if cache_file is not None and cache_file.is_file():
        try:
            known = json.loads(cache_file.read_text())
        except ValueError:
            known = {}
        if token in known:
            return known[token]
    value = sha256_of(path)
    if cache_file is not None:
        known[token] = value
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_name(f".{cache_file.name}.{os.getpid()}")
        tmp.write_text(json.dumps(known))
        os.replace(tmp, cache_file)
    return value


def source_digest(path: Path, cache_file: Path | None = None) -> str:
    """Content digest of a checkpoint: the file's SHA-256, or for a diffusers dir a hash of its weights."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"not found: {path}")
    if path.is_file():
        return file_sha256(path, cache_file)
    parts = [f"{p.relative_to(path)}={file_sha256(p, cache_file)}"
             for p in sorted(path.rglob("*")) if p.is_file() and p.suffix in (".safetensors", ".json")]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def cached_merge(settings: Settings, recipe: MergeRecipe, progress: Progress | None = None) -> Path:
    """The merged checkpoint of ``recipe``, built once and then reused.

    Stored at ``<data_dir>/cache/merges/<digest>`` where the digest is that of the recipe over its inputs'
    SHA-256s (:meth:`MergeRecipe.digest`); the cache is bounded by ``merge_cache_bytes`` and shared safely
    between processes (``merger.merge_cache``). An SD1.5 merge is one original-layout ``.safetensors``
    (a diffusers-dir base too: ``from_single_file(path, config=<base dir>)`` loads it).
    """
    base = Path(recipe.base)
    experts = [(Path(p), w) for p, w in recipe.experts]
    swapped = _swap_in(base, experts, recipe.merge_method, settings.allow_pickle)
    if swapped is not None:
        return swapped
    hashes = Path(settings.data_dir) / "cache" / "sha256.json"
    base_digest = source_digest(base, hashes)
    expert_digests = [source_digest(p, hashes) for p, _ in experts]
    key = recipe.with_sources(base_digest, expert_digests).digest()
    # SD1.5 merges become one original-layout file; the other families' original layouts fuse tensors, so a
    # diffusers base stays a diffusers directory (unchanged components linked, not copied: FLUX's T5 is 9 GB)
    as_dir = base.is_dir() and _dir_arch(base) != "sd15"
    provenance = {"base_sha256": base_digest, "expert_sha256": expert_digests, "cache_key": key}
    cache = MergeCache(Path(settings.data_dir) / "cache" / "merges", settings.merge_cache_bytes)
    return cache.get_or_build(key, lambda out: merge(
        recipe, out, progress, allow_pickle=settings.allow_pickle, provenance=provenance, link_unchanged=as_dir),
        directory=as_dir)


def merged_checkpoint(settings: Settings, base: Path, experts: list[tuple[Path, float]],
                      method: str = "task_arithmetic", dtype: str | None = None, density: float = 0.5,
                      seed: int = 0, progress: Progress | None = None) -> Path:
    """:func:`cached_merge` with the recipe spelled out as arguments (``dtype`` defaults to the settings')."""
    recipe = MergeRecipe(str(base), tuple((str(p), float(w)) for p, w in experts), method, density, seed,
                         dtype or settings.resolved_dtype())
    return cached_merge(settings, recipe, progress)


def _dir_arch(path: Path) -> str:
    from merger.families import family_for_pipeline_class

    try:
        class_name = json.loads((path / "model_index.json").read_text()).get("_class_name", "")
    except (OSError, ValueError):
        return ""
    fam = family_for_pipeline_class(class_name)
    return fam.arch if fam is not None else ""


def _swap_in(base: Path, experts: list[tuple[Path, float]], method: str, allow_pickle: bool) -> Path | None:
    """The expert file itself when the merge would reproduce it: one complete single-file checkpoint at
    weight 1.0 under task arithmetic or weighted average (θ_base + 1·(θ_e − θ_base) = θ_e).

    Calibration swaps every checkpoint in this way; without the shortcut each one would leave a
    full-size merged copy in the cache.
    """
    if len(experts) != 1 or float(experts[0][1]) != 1.0 or method not in {"task_arithmetic", "weighted_average"}:
        return None
    expert = Path(experts[0][0])
    if not expert.is_file() or expert.suffix != ".safetensors":
        return None
    with open_source(base, allow_pickle=allow_pickle) as src, \
            open_source(expert, allow_pickle=allow_pickle, family=src.family.name) as exp:
        if exp.layout != "single_file":
            return None
        refs = align(src, exp)  # same family and shapes, or the clear error the merge would give
        if not all(ref.file is exp.files[""] for ref in refs.values()):
            return None  # a partial (e.g. UNet-only) expert still needs the base's other components
    return expert


def read_recipe(path: Path) -> dict[str, Any] | None:
    """The provenance summary a merged file carries in its ``__metadata__`` (None if it carries none)."""
    from merger.safe_load import read_header

    _, metadata = read_header(Path(path))
    raw = metadata.get("diffgraph_recipe")
    return json.loads(raw) if raw else None


def read_merge_recipe(path: Path) -> MergeRecipe | None:
    """The :class:`MergeRecipe` a merged file was built from (None for files merged before recipes)."""
    from merger.safe_load import read_header

    _, metadata = read_header(Path(path))
    raw = metadata.get(METADATA_KEY)
    return MergeRecipe.from_json(raw) if raw else None
