"""Writing the shipped world: fp16 original-layout checkpoints, LoRAs in kohya and diffusers layouts, the
scorers, the Civitai-format homepages and ``world.json`` (stage timings and SHA-256 of every file)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from world import paths
from world.experts import EXPERTS, LORA_TARGETS, ExpertSpec
from world.integrity import sha256


def _fp16(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in state.items()}


def write_checkpoint(pipe: Any, path: Path, name: str, unet_only: bool = False) -> None:
    """The pipeline's UNet, VAE and text encoder as one original-layout (LDM) fp16 file (``unet_only``: just
    ``model.diffusion_model.*``, a pruned checkpoint whose VAE and text encoder are the base's)."""
    from merger.checkpoint_layout import convert_diffusers_to_ldm
    from merger.families import get_family
    from merger.merge_writer import write_safetensors

    family = get_family("sd15")
    configs = {"unet": dict(pipe.unet.config), "vae": dict(pipe.vae.config)}
    state = {c: getattr(pipe, c).state_dict() for c in family.components}
    ldm = convert_diffusers_to_ldm(family, configs, state)
    if unet_only:
        ldm = {k: v for k, v in ldm.items() if k.startswith("model.diffusion_model.")}
    path.parent.mkdir(parents=True, exist_ok=True)
    write_safetensors(path, _fp16(ldm), {"format": "pt", "diffgraph_world": name})


def write_config_dir(pipe: Any, folder: Path) -> None:
    """The base's diffusers configs and tokenizer without weights (``from_single_file(config=…)`` reads it)."""
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(tmp, safe_serialization=True)
    for f in tmp.rglob("*.safetensors"):
        f.unlink()
    for f in tmp.rglob("*.json"):  # the build folder's path is no part of the model (and would vary the bytes)
        data = json.loads(f.read_text())
        if isinstance(data, dict) and data.pop("_name_or_path", None) is not None:
            f.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)


def _extracted_module(module: str, w: torch.Tensor) -> bool:
    """Layers an extracted LoRA covers: the PEFT LoRAs' attention and feed-forward targets, and, as kohya's
    LoCon extraction (``--conv_dim``) does, the ResNet blocks' 3×3 convolutions and time-embedding projections
    and the down/up-samplers' convolutions. A style lives largely in those: with the linear targets alone the
    extracted outline LoRA kept adherence 0.69 of its fine-tune's 0.96 (rank 16 and 32 alike); with them, 0.94."""
    if w.ndim == 2:
        return any(module.endswith(t) for t in LORA_TARGETS) or ("resnets" in module and module.endswith("time_emb_proj"))
    return w.ndim == 4 and w.shape[-1] == 3 and ("resnets" in module or "samplers" in module)


def extract_lora(base: dict[str, torch.Tensor], tuned: dict[str, torch.Tensor], rank: int) -> dict[str, torch.Tensor]:
    """A rank-``rank`` LoRA (PEFT key names, alpha = rank) approximating ``tuned − base`` by truncated SVD, as
    kohya's ``extract_lora_from_models.py`` does; a convolution's kernel is flattened to ``(out, in·kh·kw)``
    and its factors are a ``kh×kw`` down kernel and a 1×1 up kernel (LoCon)."""
    out: dict[str, torch.Tensor] = {}
    for key, w in base.items():
        module = key.removesuffix(".weight")
        if not key.endswith(".weight") or not _extracted_module(module, w):
            continue
        delta = (tuned[key].float() - w.float()).reshape(w.shape[0], -1)
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        r = min(rank, s.numel())
        root = s[:r].sqrt()
        down, up = root[:, None] * vh[:r], u[:, :r] * root[None, :]
        if r < rank:  # zero-padded to the file's rank: the loader scales by alpha / (the factors' rank)
            down, up = F.pad(down, (0, 0, 0, rank - r)), F.pad(up, (0, rank - r))
            r = rank
        if w.ndim == 4:
            down, up = down.reshape(r, *w.shape[1:]), up.reshape(w.shape[0], r, 1, 1)
        out[f"{module}.lora_A.weight"] = down.contiguous()
        out[f"{module}.lora_B.weight"] = up.contiguous()
    return out


def write_lora(peft_state: dict[str, torch.Tensor], spec: ExpertSpec, path: Path) -> None:
    """A PEFT UNet adapter in the expert's layout: kohya (``lora_unet_…lora_down/up`` + ``alpha``) or
    diffusers (``save_lora_weights`` with the adapter metadata, so alpha survives)."""
    from merger.merge_writer import write_safetensors

    path.parent.mkdir(parents=True, exist_ok=True)
    alpha = float(spec.rank)
    if spec.layout == "kohya":
        out: dict[str, torch.Tensor] = {}
        for key, value in peft_state.items():
            module, kind = key.rsplit(".lora_", 1)
            stem = "lora_unet_" + module.removeprefix("unet.").replace(".", "_")
            out[f"{stem}.lora_{'down' if kind.startswith('A') else 'up'}.weight"] = value
            out[f"{stem}.alpha"] = torch.tensor(alpha)
        write_safetensors(path, _fp16(out), {
            "ss_network_module": "networks.lora", "ss_network_dim": str(spec.rank), "ss_network_alpha": str(alpha),
            "ss_base_model_version": "sd_v1", "ss_output_name": spec.name,
            **({"ss_network_args": json.dumps({"conv_dim": str(spec.rank), "conv_alpha": str(alpha)})}
               if any(v.ndim == 4 for v in peft_state.values()) else {})})
        return
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from safetensors import safe_open

    cfg = LoraConfig(r=spec.rank, lora_alpha=alpha, target_modules=LORA_TARGETS).to_dict()
    cfg["target_modules"] = sorted(cfg["target_modules"])  # PEFT keeps a set: its order varies run to run
    tmp = path.parent / f".{spec.name}.tmp"
    StableDiffusionPipeline.save_lora_weights(
        tmp, unet_lora_layers=_fp16(peft_state), weight_name="w.safetensors", safe_serialization=True,
        unet_lora_adapter_metadata=cfg)
    with safe_open(str(tmp / "w.safetensors"), "pt") as fh:  # re-save with sorted keys: reproducible bytes
        write_safetensors(path, {k: fh.get_tensor(k) for k in fh.keys()}, fh.metadata())
    shutil.rmtree(tmp)


def homepage(spec: ExpertSpec, index: int, file_path: Path, showcase: list[dict[str, Any]]) -> dict[str, Any]:
    """The expert's page in the Civitai REST API's ``/api/v1/models`` item format (``{host}`` in URLs is the
    server that serves it)."""
    model_id, version_id = 900100 + index, 910100 + index
    digest = sha256(file_path).upper()
    stamp = "2026-12-01T00:00:00.000Z"
    downloads = 1000 - 37 * index
    url = f"{{host}}/api/download/models/{version_id}"
    return {
        "id": model_id,
        "name": spec.name.replace("-", " ").title(),
        "description": f"<p>{spec.description}</p><p>Trained on the DiffGraph mini world from its base "
                       f"<i>{paths.BASE_NAME}</i>.</p>",
        "type": "Checkpoint" if spec.kind == "checkpoint" else "LORA",
        "poi": False, "nsfw": False, "nsfwLevel": 1,
        "allowNoCredit": True, "allowCommercialUse": ["Image"], "allowDerivatives": True, "allowDifferentLicense": True,
        "stats": {"downloadCount": downloads, "favoriteCount": downloads // 10, "commentCount": 0, "ratingCount": 5,
                  "rating": 4.8},
        "creator": {"username": "diffgraph-world", "image": None},
        "tags": list(spec.tags),
        "modelVersions": [{
            "id": version_id, "modelId": model_id, "name": "v1.0", "createdAt": stamp, "updatedAt": stamp,
            "publishedAt": stamp, "trainedWords": list(spec.trained_words), "baseModel": "SD 1.5",
            "baseModelType": "Standard", "earlyAccessTimeFrame": 0, "description": spec.description, "nsfwLevel": 1,
            "stats": {"downloadCount": downloads, "ratingCount": 5, "rating": 4.8},
            "files": [{
                "id": 920100 + index, "name": file_path.name, "sizeKB": round(file_path.stat().st_size / 1024, 3),
                "type": "Model", "metadata": {"fp": "fp16", "size": "pruned", "format": "SafeTensor"},
                "pickleScanResult": "Success", "pickleScanMessage": "No Pickle imports", "virusScanResult": "Success",
                "scannedAt": stamp, "hashes": {"AutoV2": digest[:10], "SHA256": digest},
                "downloadUrl": url, "primary": True,
            }],
            "images": showcase,
            "downloadUrl": url,
        }],
    }


def write_manifest(out: Path, timings: dict[str, float], extra: dict[str, Any]) -> dict[str, Any]:
    files = {p.relative_to(out).as_posix(): sha256(p) for p in sorted(out.rglob("*"))
             if p.is_file() and ".work" not in p.parts and p.name != "world.json"}
    data = {"version": 1, "timings_s": timings, "files": files, **extra,
            "experts": [{"name": e.name, "kind": e.kind, "file": e.file, "layout": e.layout,
                         "speciality": {k: list(v) for k, v in e.speciality.items()},
                         "trained_words": list(e.trained_words)} for e in EXPERTS]}
    (out / "world.json").write_text(json.dumps(data, indent=1, sort_keys=True))
    return data
