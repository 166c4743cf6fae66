"""Opening base models and checkpoint experts, detecting their family and key layout, and aligning an
expert's tensors to the base's keys (converting between diffusers and original layouts when they differ).

A :class:`ModelSource` is either a single ``.safetensors`` file in the original (LDM) layout or a diffusers
directory. Its *native keys* are the single file's keys, or ``"<component>/<key>"`` for a diffusers dir.
:func:`align` gives, for every base key of a merged component, where the expert keeps that tensor.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from merger.checkpoint_layout import (
    LdmKey,
    Segment,
    flux_segments_from_diffusers,
    flux_segments_from_original,
    infer_ldm_configs,
    ldm_key_map,
    ldm_key_to_diffusers,
    ldm_tables,
    openclip_segments_from_diffusers,
    openclip_segments_from_original,
    to_diffusers_tensor,
    to_ldm_tensor,
)
from merger.errors import IncompatibleExpert, MergeError
from merger.families import FAMILIES, Family, detect_single_file_family, family_for_pipeline_class
from merger.safe_load import WeightFile, open_sharded, open_weights

if TYPE_CHECKING:
    import torch

Layout = Literal["single_file", "diffusers"]
# Weight file names diffusers writes per component, preferred first (non-variant before fp16 variants).
_COMPONENT_FILES = ("diffusion_pytorch_model.safetensors", "model.safetensors",
                    "diffusion_pytorch_model.fp16.safetensors", "model.fp16.safetensors")


@dataclass
class TensorRef:
    """One tensor of one source, read lazily. ``conv_1x1`` converts between the original layout's 1×1-conv
    form of a VAE attention weight and diffusers' linear form: ``"to_ldm"`` or ``"to_diffusers"``. ``rows``
    reads only those rows (one part of a fused tensor); ``transpose`` reads a 2-D tensor transposed."""

    file: WeightFile
    key: str
    conv_1x1: Literal["to_ldm", "to_diffusers"] | None = None
    rows: tuple[int, int] | None = None
    transpose: bool = False

    def shape(self) -> tuple[int, ...]:
        shape = self.file.shape(self.key)
        if self.conv_1x1 == "to_ldm" and len(shape) == 2:
            return (*shape, 1, 1)
        if self.conv_1x1 == "to_diffusers" and len(shape) == 4:
            return shape[:2]
        if self.rows is not None:
            shape = (self.rows[1] - self.rows[0], *shape[1:])
        if self.transpose and len(shape) == 2:
            shape = (shape[1], shape[0])
        return tuple(shape)

    def load(self) -> torch.Tensor:
        tensor = self.file.get(self.key)
        if self.conv_1x1 == "to_ldm":
            return to_ldm_tensor(tensor, LdmKey("vae", self.key, conv_1x1=True))
        if self.conv_1x1 == "to_diffusers":
            return to_diffusers_tensor(tensor, LdmKey("vae", self.key, conv_1x1=True))
        if self.rows is not None:
            tensor = tensor[self.rows[0]:self.rows[1]]
        if self.transpose and tensor.dim() == 2:
            tensor = tensor.T.contiguous()
        return tensor


@dataclass
class ConcatRef:
    """A tensor assembled from row parts of other tensors (a fused original tensor from diffusers parts,
    or a diffusers tensor whose rows the original stores in another order)."""

    parts: list[TensorRef]

    @property
    def file(self) -> WeightFile:
        return self.parts[0].file

    @property
    def key(self) -> str:
        return self.parts[0].key

    def shape(self) -> tuple[int, ...]:
        shapes = [p.shape() for p in self.parts]
        return (sum(s[0] for s in shapes), *shapes[0][1:])

    def load(self) -> torch.Tensor:
        import torch

        return torch.cat([p.load() for p in self.parts], dim=0)


@dataclass
class ModelSource:
    """An opened base model or checkpoint expert (close it, or use it as a context manager)."""

    path: Path
    name: str
    family: Family
    layout: Layout
    files: dict[str, WeightFile]  # "" for a single file, else component → its weight file
    configs: dict[str, dict[str, Any]] = field(default_factory=dict)  # diffusers component configs
    prefixes: dict[str, str] = field(default_factory=dict)  # single file: component → key prefix in this file

    def __post_init__(self) -> None:
        if self.layout == "single_file" and not self.prefixes:
            self.prefixes = dict(self.family.prefixes)

    def native_keys(self) -> list[str]:
        if self.layout == "single_file":
            return self.files[""].keys()
        return [f"{c}/{k}" for c, wf in self.files.items() for k in wf.keys()]

    def ref(self, native_key: str) -> TensorRef:
        if self.layout == "single_file":
            return TensorRef(self.files[""], native_key)
        component, key = native_key.split("/", 1)
        return TensorRef(self.files[component], key)

    def component_of(self, native_key: str) -> str | None:
        """The merged component a native key belongs to (None: carried over from the base unmerged)."""
        if self.layout == "single_file":
            return next((c for c, p in self.prefixes.items() if native_key.startswith(p)), None)
        component = native_key.split("/", 1)[0]
        return component if component in self.family.components else None

    def weight_files(self) -> list[Path]:
        return [wf.path for wf in self.files.values()]

    def close(self) -> None:
        for wf in self.files.values():
            wf.close()

    def __enter__(self) -> ModelSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_source(path: Path | str, name: str | None = None, allow_pickle: bool = False,
                family: str | None = None) -> ModelSource:
    """Open a base model or checkpoint expert and detect its family and layout.

    Args:
        path (`Path`): a single-file checkpoint (original SD layout) or a diffusers pipeline directory.
        name (`str`, *optional*): how errors name this model (defaults to the file name).
        allow_pickle (`bool`, *optional*): see :func:`merger.safe_load.open_weights`.
        family (`str`, *optional*): the family to assume when the file carries no sentinel key (a UNet-only file).

    Raises:
        FileNotFoundError, UnsafeFormat, CorruptWeights: see ``open_weights``.
        IncompatibleExpert: the file is not a checkpoint of any known family (a LoRA, for example).
    """
    path = Path(path)
    name = name or path.name
    if path.is_dir():
        return _open_diffusers_dir(path, name)
    wf = open_weights(path, allow_pickle=allow_pickle)
    keys = wf.keys()
    detected = detect_single_file_family(keys)
    if detected is None:
        detected = _unet_only_family(wf)
        if detected is None and family is not None and any(k.startswith("model.diffusion_model.") for k in keys):
            detected = FAMILIES.get(family)
        if detected is None:
            wf.close()
            hint = " (it looks like a LoRA)" if any(".lora_" in k or "lora_unet_" in k for k in keys[:50]) else ""
            raise IncompatibleExpert(f"{name}: not a checkpoint of a known model family{hint}")
    prefixes = dict(detected.prefixes)
    if detected.arch == "flux" and "double_blocks.0.img_attn.norm.key_norm.scale" in keys:
        prefixes = {"transformer": ""}  # a bare BFL transformer file (flux1-dev.safetensors)
    return ModelSource(path, name, detected, "single_file", {"": wf}, prefixes=prefixes)


_CROSS_ATTENTION_WIDTH = {768: "sd15", 1024: "sd2", 2048: "sdxl"}


def _unet_only_family(wf: WeightFile) -> Family | None:
    """A UNet-only original-layout file: its cross-attention width tells SD1.5 (768), SD2 (1024), SDXL (2048)."""
    for key in wf.keys():
        if key.startswith("model.diffusion_model.") and key.endswith("attn2.to_k.weight"):
            name = _CROSS_ATTENTION_WIDTH.get(wf.shape(key)[-1])
            return FAMILIES[name] if name else None
    return None


def _open_diffusers_dir(path: Path, name: str) -> ModelSource:
    index = path / "model_index.json"
    if not index.is_file():
        raise MergeError(f"{name}: a directory but not a diffusers pipeline (no model_index.json)")
    try:
        class_name = json.loads(index.read_text()).get("_class_name", "")
    except ValueError:
        raise MergeError(f"{name}: unreadable model_index.json") from None
    te_config = _read_config(path / "text_encoder")
    family = family_for_pipeline_class(class_name, te_config.get("hidden_size") if te_config else None)
    if family is None:
        raise IncompatibleExpert(f"{name}: unknown pipeline class {class_name!r}")
    files: dict[str, WeightFile] = {}
    configs: dict[str, dict[str, Any]] = {}
    try:
        for component in family.components:
            folder = path / component
            weight = next((folder / f for f in _COMPONENT_FILES if (folder / f).is_file()), None)
            if weight is None:
                index_files = sorted(folder.glob("*.safetensors.index.json"))
                if not index_files:
                    raise MergeError(f"{name}: {component}/ has no safetensors weights")
                files[component] = open_sharded(index_files[0])
            else:
                files[component] = open_weights(weight)
            configs[component] = _read_config(folder) or {}
    except BaseException:
        for wf in files.values():
            wf.close()
        raise
    return ModelSource(path, name, family, "diffusers", files, configs)


def _read_config(folder: Path) -> dict[str, Any] | None:
    try:
        return json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return None


def align(base: ModelSource, expert: ModelSource) -> dict[str, TensorRef | ConcatRef]:
    """Where ``expert`` keeps each merged-component tensor of ``base``, keyed by the base's native keys.

    A component the expert lacks entirely (a UNet-only file) maps to the base's own tensors, so that
    expert leaves it unchanged. Buffers that some files omit (CLIP's ``position_ids``) come from the base.
    Keys are checked in sorted order, so the error names the first mismatch.

    Raises:
        IncompatibleExpert: other architecture; a component only partly present; a tensor of another shape.
    """
    if expert.family.arch != base.family.arch:
        raise IncompatibleExpert(
            f"{expert.name} is a {expert.family.name} model but the base {base.name} is {base.family.name}"
        )
    lookup = _expert_lookup(base, expert)
    present = {lookup[k][0] for k in lookup}
    out: dict[str, TensorRef | ConcatRef] = {}
    for native in sorted(base.native_keys()):
        component = base.component_of(native)
        if component is None:
            continue
        hit = lookup.get(native)
        if hit is None:
            if component in present and not _is_buffer(native):
                raise IncompatibleExpert(f"{expert.name}: missing tensor {native!r} that the base has")
            out[native] = base.ref(native)
            continue
        ref = hit[1]
        want, got = base.ref(native).shape(), ref.shape()
        if tuple(want) != tuple(got):
            raise IncompatibleExpert(
                f"{expert.name}: tensor {native!r} has shape {tuple(got)}, the base has {tuple(want)}"
            )
        out[native] = ref
    return out


#: Non-learned buffers that some exporters drop (an SD1.5 file without CLIP's ``position_ids``); the base's
#: copy is used. Learned weights are never filled in.
_BUFFER_SUFFIXES = ("embeddings.position_ids",)


def _is_buffer(native: str) -> bool:
    return native.endswith(_BUFFER_SUFFIXES)


def segments_of(diff: ModelSource, orig_prefixes: dict[str, str]) -> list[Segment]:
    """Every row segment between a diffusers source's tensors and the original layout (named with
    ``orig_prefixes``, the single-file side's component prefixes)."""
    family = diff.family
    segs: list[Segment] = []
    one_to_one = {c: wf.keys() for c, wf in diff.files.items() if c in ("unet", "vae", "text_encoder")}
    if one_to_one:
        mapping = ldm_key_map(family, diff.configs, one_to_one)
        for name, where in mapping.items():
            component = where.component
            name = orig_prefixes.get(component, family.prefixes[component]) + name[len(family.prefixes[component]):]
            segs.append(Segment(name, component, where.key, conv_1x1=where.conv_1x1))
    if "text_encoder_2" in diff.files:
        wf = diff.files["text_encoder_2"]
        segs += openclip_segments_from_diffusers(wf.keys(), wf.shape, orig_prefixes.get(
            "text_encoder_2", family.prefixes["text_encoder_2"]))
    if "transformer" in diff.files:
        wf = diff.files["transformer"]
        segs += flux_segments_from_diffusers(wf.keys(), wf.shape, orig_prefixes.get(
            "transformer", family.prefixes["transformer"]))
    return segs


def _original_segments(src: ModelSource) -> list[Segment]:
    """Row segments of a single-file source, read off its own keys (no diffusers config needed)."""
    keys = src.native_keys()
    wf = src.files[""]
    segs: list[Segment] = []
    if "text_encoder_2" in src.prefixes and src.prefixes["text_encoder_2"] + "positional_embedding" in wf:
        segs += openclip_segments_from_original(keys, wf.shape, src.prefixes["text_encoder_2"])
    if "transformer" in src.prefixes:
        segs += flux_segments_from_original(keys, wf.shape, src.prefixes["transformer"])
    return segs


def _expert_lookup(base: ModelSource, expert: ModelSource) -> dict[str, tuple[str, TensorRef | ConcatRef]]:
    """base native key → (component, expert tensor) for every tensor the expert has."""
    result: dict[str, tuple[str, TensorRef | ConcatRef]] = {}
    if base.layout == expert.layout == "single_file":
        renames = {p: base.prefixes.get(c, p) for c, p in expert.prefixes.items()}
        for key in expert.native_keys():
            component = expert.component_of(key)
            if component is not None:
                prefix = expert.prefixes[component]
                result[renames[prefix] + key[len(prefix):]] = (component, expert.ref(key))
        return result
    if base.layout == expert.layout == "diffusers":
        base_te = {_te_norm(k): k for k in base.native_keys() if k.startswith("text_encoder/")}
        for key in expert.native_keys():
            component = expert.component_of(key)
            if component is None:
                continue
            target = base_te.get(_te_norm(key), key) if component == "text_encoder" else key
            result[target] = (component, expert.ref(key))
        return result
    if base.layout == "diffusers":  # expert is a single file in the original layout
        wf = expert.files[""]
        parts: dict[str, list[tuple[int, TensorRef]]] = {}
        for seg in segments_of(base, expert.prefixes):
            if seg.original not in wf:
                continue
            ref = TensorRef(wf, seg.original, "to_diffusers" if seg.conv_1x1 else None, seg.orig_rows, seg.transpose)
            parts.setdefault(f"{seg.component}/{seg.key}", []).append((seg.diff_rows[0] if seg.diff_rows else 0, ref))
        for native, items in parts.items():
            refs = [r for _, r in sorted(items, key=lambda x: x[0])]
            result[native] = (native.split("/", 1)[0], refs[0] if len(refs) == 1 else ConcatRef(refs))
        return result
    # base is a single file, expert a diffusers dir
    fused: dict[str, list[tuple[int, TensorRef]]] = {}
    components: dict[str, str] = {}
    for seg in segments_of(expert, base.prefixes):
        if seg.key not in expert.files[seg.component]:
            continue
        ref = TensorRef(expert.files[seg.component], seg.key, "to_ldm" if seg.conv_1x1 else None, seg.diff_rows,
                        seg.transpose)
        fused.setdefault(seg.original, []).append((seg.orig_rows[0] if seg.orig_rows else 0, ref))
        components[seg.original] = seg.component
    for name, items in fused.items():
        refs = [r for _, r in sorted(items, key=lambda x: x[0])]
        result[name] = (components[name], refs[0] if len(refs) == 1 else ConcatRef(refs))
    return result


def _te_norm(native_key: str) -> str:
    return native_key.replace("text_encoder/text_model.", "text_encoder/", 1)


def ldm_names_for(base: ModelSource) -> dict[str, tuple[str, bool]]:
    """For a diffusers SD1.5 base: native key → (original-layout key, needs 1×1-conv reshape).

    Raises:
        MergeError: other families, whose original layouts fuse tensors: write a diffusers directory.
    """
    if base.family.arch != "sd15":
        raise MergeError(f"a diffusers {base.family.name} base is written as a diffusers directory, not as one "
                         "original-layout file: give --out a directory name")
    mapping = ldm_key_map(base.family, base.configs, {c: wf.keys() for c, wf in base.files.items()})
    return {f"{w.component}/{w.key}": (name, w.conv_1x1) for name, w in mapping.items()}


def diffusers_names(base: ModelSource) -> dict[str, list[Segment]]:
    """For each merged-component native key of ``base``: the diffusers tensors it holds, as row segments
    (component, key — text-encoder keys without ``text_model.`` — and rows on each side).

    For a single file the key structure is read off the file itself (:func:`infer_ldm_configs`), so no
    diffusers config is needed.
    """
    out: dict[str, list[Segment]] = {}
    if base.layout == "diffusers":
        for native in base.native_keys():
            component, key = native.split("/", 1)
            if component in base.family.components:
                key = key.removeprefix("text_model.") if component == "text_encoder" else key
                out[native] = [Segment(native, component, key)]
        return out
    keys = base.native_keys()
    for seg in _original_segments(base):
        out.setdefault(seg.original, []).append(seg)
    if base.family.arch in ("sd15", "sdxl"):
        family = replace(base.family, prefixes={c: p for c, p in base.prefixes.items()
                                                if c in ("unet", "vae", "text_encoder")})
        configs = infer_ldm_configs(keys, family)
        tables = ldm_tables(configs)
        for native in keys:
            where = ldm_key_to_diffusers(native, family, configs, tables)
            if where is not None:
                out[native] = [Segment(native, where.component, where.key, conv_1x1=where.conv_1x1)]
    return out
