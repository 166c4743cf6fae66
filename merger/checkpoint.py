"""Opening base models and checkpoint experts, detecting their family and key layout, and aligning an
expert's tensors to the base's keys (converting between diffusers and original layouts when they differ).

A :class:`ModelSource` is either a single ``.safetensors`` file in the original (LDM) layout or a diffusers
directory. Its *native keys* are the single file's keys, or ``"<component>/<key>"`` for a diffusers dir.
:func:`align` gives, for every base key of a merged component, where the expert keeps that tensor.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from merger.checkpoint_layout import (
    LdmKey,
    infer_ldm_configs,
    ldm_key_map,
    ldm_key_to_diffusers,
    ldm_tables,
    to_diffusers_tensor,
    to_ldm_tensor,
)
from merger.errors import IncompatibleExpert, MergeError
from merger.families import FAMILIES, Family, detect_single_file_family, family_for_pipeline_class
from merger.safe_load import WeightFile, open_weights

if TYPE_CHECKING:
    import torch

Layout = Literal["single_file", "diffusers"]
# Weight file names diffusers writes per component, preferred first (non-variant before fp16 variants).
_COMPONENT_FILES = ("diffusion_pytorch_model.safetensors", "model.safetensors",
                    "diffusion_pytorch_model.fp16.safetensors", "model.fp16.safetensors")


@dataclass
class TensorRef:
    """One tensor of one source, read lazily. ``conv_1x1`` converts between the original layout's 1×1-conv
    form of a VAE attention weight and diffusers' linear form: ``"to_ldm"`` or ``"to_diffusers"``."""

    file: WeightFile
    key: str
    conv_1x1: Literal["to_ldm", "to_diffusers"] | None = None

    def shape(self) -> tuple[int, ...]:
        shape = self.file.shape(self.key)
        if self.conv_1x1 == "to_ldm" and len(shape) == 2:
            return (*shape, 1, 1)
        if self.conv_1x1 == "to_diffusers" and len(shape) == 4:
            return shape[:2]
        return shape

    def load(self) -> torch.Tensor:
        tensor = self.file.get(self.key)
        if self.conv_1x1 == "to_ldm":
            return to_ldm_tensor(tensor, LdmKey("vae", self.key, conv_1x1=True))
        if self.conv_1x1 == "to_diffusers":
            return to_diffusers_tensor(tensor, LdmKey("vae", self.key, conv_1x1=True))
        return tensor


@dataclass
class ModelSource:
    """An opened base model or checkpoint expert (close it, or use it as a context manager)."""

    path: Path
    name: str
    family: Family
    layout: Layout
    files: dict[str, WeightFile]  # "" for a single file, else component → its weight file
    configs: dict[str, dict[str, Any]] = field(default_factory=dict)  # diffusers component configs

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
            return self.family.component_of(native_key)
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
    return ModelSource(path, name, detected, "single_file", {"": wf})


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
                if list(folder.glob("*.safetensors.index.json")):
                    raise MergeError(f"{name}: sharded {component} weights are not supported yet")
                raise MergeError(f"{name}: {component}/ has no safetensors weights")
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


def align(base: ModelSource, expert: ModelSource) -> dict[str, TensorRef]:
    """Where ``expert`` keeps each merged-component tensor of ``base``, keyed by the base's native keys.

    A component the expert lacks entirely (a UNet-only file) maps to the base's own tensors, so that
    expert leaves it unchanged. Keys are checked in sorted order, so the error names the first mismatch.

    Raises:
        IncompatibleExpert: other family; a component only partly present; a tensor of another shape.
    """
    if expert.family.name != base.family.name:
        raise IncompatibleExpert(
            f"{expert.name} is a {expert.family.name} model but the base {base.name} is {base.family.name}"
        )
    lookup = _expert_lookup(base, expert)
    present = {lookup[k][0] for k in lookup}
    out: dict[str, TensorRef] = {}
    for native in sorted(base.native_keys()):
        component = base.component_of(native)
        if component is None:
            continue
        hit = lookup.get(native)
        if hit is None:
            if component in present:
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


def _expert_lookup(base: ModelSource, expert: ModelSource) -> dict[str, tuple[str, TensorRef]]:
    """base native key → (component, expert tensor) for every tensor the expert has."""
    result: dict[str, tuple[str, TensorRef]] = {}
    if base.layout == expert.layout == "single_file":
        for key in expert.native_keys():
            component = expert.component_of(key)
            if component is not None:
                result[key] = (component, expert.ref(key))
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
    diff = base if base.layout == "diffusers" else expert
    mapping = ldm_key_map(diff.family, diff.configs, {c: wf.keys() for c, wf in diff.files.items()})
    if base.layout == "diffusers":  # expert is a single file in the original layout
        keys = set(expert.native_keys())
        for ldm_name, where in mapping.items():
            if ldm_name in keys:
                ref = TensorRef(expert.files[""], ldm_name, "to_diffusers" if where.conv_1x1 else None)
                result[f"{where.component}/{where.key}"] = (where.component, ref)
    else:  # base is a single file, expert a diffusers dir
        for ldm_name, where in mapping.items():
            ref = TensorRef(expert.files[where.component], where.key, "to_ldm" if where.conv_1x1 else None)
            result[ldm_name] = (where.component, ref)
    return result


def _te_norm(native_key: str) -> str:
    return native_key.replace("text_encoder/text_model.", "text_encoder/", 1)


def ldm_names_for(base: ModelSource) -> dict[str, tuple[str, bool]]:
    """For a diffusers base: native key → (original-layout key, needs 1×1-conv reshape)."""
    mapping = ldm_key_map(base.family, base.configs, {c: wf.keys() for c, wf in base.files.items()})
    return {f"{w.component}/{w.key}": (name, w.conv_1x1) for name, w in mapping.items()}


def diffusers_names(base: ModelSource) -> dict[str, LdmKey]:
    """For each merged-component native key of ``base``: its diffusers component and key (text-encoder keys
    without ``text_model.``) and whether the native tensor is the original 1×1-conv form of a linear weight.

    For a single file the key structure is read off the file itself (:func:`infer_ldm_configs`), so no
    diffusers config is needed.
    """
    out: dict[str, LdmKey] = {}
    if base.layout == "diffusers":
        for native in base.native_keys():
            component, key = native.split("/", 1)
            if component in base.family.components:
                out[native] = LdmKey(component, key.removeprefix("text_model.") if component == "text_encoder" else key)
        return out
    keys = base.native_keys()
    configs = infer_ldm_configs(keys, base.family)
    tables = ldm_tables(configs)
    for native in keys:
        where = ldm_key_to_diffusers(native, base.family, configs, tables)
        if where is not None:
            out[native] = where
    return out
