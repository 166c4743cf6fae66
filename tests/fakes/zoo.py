"""A tiny, offline, deterministic SD1.5-architecture model zoo for tests and CPU benchmarks.

``build_tiny_zoo(root)`` writes a random-initialised base pipeline (diffusers dir and one original-layout
single file), three checkpoint experts (the base perturbed), and LoRAs in kohya and diffusers layouts,
where ``lora_pairs[i]`` hold the same deltas in both layouts. A complete zoo at ``root`` is reused.
"""

from __future__ import annotations

import fcntl
import json
import re
import shutil
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from diffusers import StableDiffusionPipeline

ZOO_VERSION = 1
MARKER = "zoo.json"
SAMPLE_PROMPTS = [
    "a photo of a red fox in a snowy forest, golden hour",
    "portrait of an old sailor with a grey beard, oil painting",
    "a futuristic city skyline at night, neon lights, cyberpunk",
    "a watercolor painting of a quiet lake with mountains",
    "a bowl of ramen on a wooden table, studio lighting",
    "an anime girl with blue hair standing in a field of flowers",
    "a cozy cabin interior with a fireplace, warm light, highly detailed",
    "a steampunk airship flying over the clouds",
]
# Words beyond the prompts so the BPE vocabulary covers common prompt words with whole-word tokens.
_EXTRA_WORDS = (
    "cat dog bird horse dragon castle tree river ocean beach sunset sunrise sky cloud rain storm winter summer "
    "spring autumn light dark shadow color colour black white green yellow purple orange pink brown gold silver "
    "man woman child girl boy face eyes hair smile dress armor sword knight robot space planet star moon sun "
    "photo photograph photorealistic realistic cinematic dramatic detailed masterpiece best quality 4k 8k hdr "
    "painting drawing sketch illustration digital art concept style artstation trending render octane unreal "
    "engine vibrant soft sharp focus bokeh wide angle close up landscape city street building house room garden "
    "flower rose forest mountain lake snow fire water stone glass metal wood"
).split()
_N_MERGES = 400


@dataclass
class TinyZoo:
    """Paths of a built tiny zoo (see :func:`build_tiny_zoo`)."""

    root: Path
    base_dir: Path
    base_file: Path
    checkpoints: list[Path]
    loras_kohya: list[Path]
    loras_diffusers: list[Path]
    prompts: list[str]
    lora_pairs: list[tuple[Path, Path]] = field(default_factory=list)
    lora_specs: list[dict[str, Any]] = field(default_factory=list)  # rank/alpha per LoRA, pairwise order

    def to_json(self) -> dict[str, Any]:
        rel = lambda p: str(Path(p).relative_to(self.root))  # noqa: E731
        return {
            "version": ZOO_VERSION,
            "base_dir": rel(self.base_dir),
            "base_file": rel(self.base_file),
            "checkpoints": [rel(p) for p in self.checkpoints],
            "loras_kohya": [rel(p) for p in self.loras_kohya],
            "loras_diffusers": [rel(p) for p in self.loras_diffusers],
            "prompts": self.prompts,
            "lora_specs": self.lora_specs,
        }

    @classmethod
    def from_json(cls, root: Path, data: dict[str, Any]) -> TinyZoo:
        kohya = [root / p for p in data["loras_kohya"]]
        diff = [root / p for p in data["loras_diffusers"]]
        return cls(
            root=root,
            base_dir=root / data["base_dir"],
            base_file=root / data["base_file"],
            checkpoints=[root / p for p in data["checkpoints"]],
            loras_kohya=kohya,
            loras_diffusers=diff,
            prompts=list(data["prompts"]),
            lora_pairs=list(zip(kohya, diff, strict=True)),
            lora_specs=list(data.get("lora_specs", [])),
        )


def build_tiny_zoo(root: Path, seed: int = 0) -> TinyZoo:
    """Build (or reuse) the tiny SD1.5-architecture zoo under ``root``.

    Args:
        root (`Path`): directory to write into; a complete zoo there (marker ``zoo.json`` with the same
            seed and version) is returned as is.
        seed (`int`, *optional*, defaults to 0): seeds every random initialisation and perturbation.

    Returns:
        `TinyZoo`: ``base_dir`` (diffusers StableDiffusionPipeline, DDIM, no safety checker), ``base_file``
        (same weights, original LDM layout), three ``checkpoints`` (original layout, fp32), two LoRAs in
        kohya and diffusers layouts each (``lora_pairs`` = equal deltas), and sample ``prompts``.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    with _locked(root):
        existing = _read_marker(root, seed)
        if existing is not None:
            return existing
        zoo = _build(root, seed)
        (root / MARKER).write_text(json.dumps({**zoo.to_json(), "seed": seed}, indent=1))
        return zoo


@contextmanager
def _locked(root: Path):
    with (root / ".zoo.lock").open("w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _read_marker(root: Path, seed: int) -> TinyZoo | None:
    marker = root / MARKER
    if not marker.is_file():
        return None
    try:
        data = json.loads(marker.read_text())
        if data.get("version") != ZOO_VERSION or data.get("seed") != seed:
            return None
        zoo = TinyZoo.from_json(root, data)
    except (ValueError, KeyError, TypeError):
        return None
    files = [zoo.base_file, *zoo.checkpoints, *zoo.loras_kohya, *zoo.loras_diffusers, zoo.base_dir / "model_index.json"]
    return zoo if all(p.exists() for p in files) else None


def _build(root: Path, seed: int) -> TinyZoo:
    import torch

    from merger.checkpoint_layout import convert_diffusers_to_ldm
    from merger.families import get_family
    from merger.merge_writer import write_safetensors

    (root / MARKER).unlink(missing_ok=True)
    for sub in ("base", "checkpoints", "loras"):
        shutil.rmtree(root / sub, ignore_errors=True)
    pipe = build_tiny_pipeline(root / "tokenizer-src", seed)
    shutil.rmtree(root / "tokenizer-src", ignore_errors=True)
    base_dir = root / "base" / "tiny-sd15"
    pipe.save_pretrained(base_dir, safe_serialization=True)

    family = get_family("sd15")
    configs = {"unet": dict(pipe.unet.config), "vae": dict(pipe.vae.config)}
    state = {c: getattr(pipe, c).state_dict() for c in family.components}
    ldm = convert_diffusers_to_ldm(family, configs, state)
    meta = {"format": "pt", "diffgraph_zoo": f"tiny-sd15 seed={seed}"}
    base_file = root / "base" / "tiny-sd15.safetensors"
    write_safetensors(base_file, ldm, meta)

    checkpoints = []
    (root / "checkpoints").mkdir(parents=True, exist_ok=True)
    for i, scale in enumerate((0.02, 0.03, 0.05)):
        gen = torch.Generator().manual_seed(seed * 1000 + 101 + i)
        perturbed = {
            k: (v + scale * torch.randn(v.shape, generator=gen, dtype=v.dtype)).contiguous()
            if v.is_floating_point() else v
            for k, v in ldm.items()
        }
        path = root / "checkpoints" / f"tiny-expert-{i}.safetensors"
        write_safetensors(path, perturbed, {**meta, "diffgraph_zoo": f"tiny-expert-{i} seed={seed}"})
        checkpoints.append(path)

    specs = [{"rank": 2, "alpha": 1.0}, {"rank": 4, "alpha": 8.0}]
    kohya, diffusers_loras = [], []
    for i, spec in enumerate(specs):
        k, d = _write_lora_pair(pipe, root / "loras", f"tiny-lora-{i}", spec["rank"], spec["alpha"],
                                seed * 1000 + 201 + i)
        kohya.append(k)
        diffusers_loras.append(d)
    return TinyZoo(
        root=root, base_dir=base_dir, base_file=base_file, checkpoints=checkpoints, loras_kohya=kohya,
        loras_diffusers=diffusers_loras, prompts=list(SAMPLE_PROMPTS),
        lora_pairs=list(zip(kohya, diffusers_loras, strict=True)), lora_specs=specs,
    )


def build_tiny_pipeline(tokenizer_dir: Path, seed: int = 0) -> StableDiffusionPipeline:
    """A random-initialised tiny SD1.5-architecture pipeline (in memory; the tokenizer is written to
    ``tokenizer_dir`` because transformers 5 only reads a BPE vocabulary through ``from_pretrained``)."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    write_tiny_tokenizer(tokenizer_dir)
    tokenizer = CLIPTokenizer.from_pretrained(str(tokenizer_dir))
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=32, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32,
    )
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(32, 64), layers_per_block=1, latent_channels=4,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), norm_num_groups=32, sample_size=64,
    )
    torch.manual_seed(seed + 2)
    text_config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, projection_dim=32,
    )
    text_encoder = CLIPTextModel(text_config)
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
        steps_offset=1,
    )
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def write_tiny_tokenizer(directory: Path) -> Path:
    """Write a small but real CLIP BPE tokenizer (vocab.json + merges.txt) learned on sample prompt words."""
    from world.models import write_clip_tokenizer

    words: Counter = Counter()
    for text in [*SAMPLE_PROMPTS, " ".join(_EXTRA_WORDS)]:
        words.update(re.findall(r"[a-z]+|[0-9]", text.lower()))
    return write_clip_tokenizer(directory, words, max_merges=_N_MERGES, model_max_length=77)


def _lora_targets(pipe: StableDiffusionPipeline) -> dict[str, list[tuple[str, torch.nn.Linear]]]:
    import torch

    unet = [(n, m) for n, m in pipe.unet.named_modules()
            if isinstance(m, torch.nn.Linear) and re.search(r"\.attn[12]\.(to_q|to_k|to_v|to_out\.0)$", n)]
    te = [(n, m) for n, m in pipe.text_encoder.named_modules()
          if isinstance(m, torch.nn.Linear) and re.search(r"self_attn\.(q_proj|k_proj|v_proj|out_proj)$", n)]
    return {"unet": unet, "text_encoder": te}


def _write_lora_pair(pipe: StableDiffusionPipeline, folder: Path, name: str, rank: int, alpha: float,
                     seed: int) -> tuple[Path, Path]:
    """One LoRA with random non-zero A and B, written in kohya and in diffusers (PEFT) layout."""
    import torch
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from safetensors import safe_open

    from merger.merge_writer import write_safetensors

    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    kohya: dict[str, torch.Tensor] = {}
    peft_layers: dict[str, dict[str, torch.Tensor]] = {"unet": {}, "text_encoder": {}}
    for component, modules in _lora_targets(pipe).items():
        for mod_name, module in modules:
            if component == "text_encoder":  # the published layout keeps CLIP's "text_model." level
                mod_name = "text_model." + mod_name.removeprefix("text_model.")
            down = torch.randn((rank, module.in_features), generator=gen) * 0.5
            up = torch.randn((module.out_features, rank), generator=gen) * 0.5
            prefix = "lora_unet_" if component == "unet" else "lora_te_"
            kname = prefix + mod_name.replace(".", "_")
            kohya[f"{kname}.lora_down.weight"] = down
            kohya[f"{kname}.lora_up.weight"] = up
            kohya[f"{kname}.alpha"] = torch.tensor(alpha)
            peft_layers[component][f"{mod_name}.lora_A.weight"] = down.clone()
            peft_layers[component][f"{mod_name}.lora_B.weight"] = up.clone()
    kohya_path = folder / f"{name}.kohya.safetensors"
    write_safetensors(kohya_path, kohya, {
        "ss_network_module": "networks.lora", "ss_network_dim": str(rank), "ss_network_alpha": str(alpha),
        "ss_base_model_version": "sd_v1",
    })

    def metadata(component: str) -> dict[str, Any]:
        # Module-name suffixes, as diffusers' training scripts write them.
        targets = ["to_q", "to_k", "to_v", "to_out.0"] if component == "unet" else ["q_proj", "k_proj", "v_proj", "out_proj"]
        return LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, init_lora_weights=False).to_dict()

    diff_dir = folder / f"{name}.diffusers"
    StableDiffusionPipeline.save_lora_weights(
        diff_dir, unet_lora_layers=peft_layers["unet"], text_encoder_lora_layers=peft_layers["text_encoder"],
        weight_name="pytorch_lora_weights.safetensors", safe_serialization=True,
        unet_lora_adapter_metadata=metadata("unet"), text_encoder_lora_adapter_metadata=metadata("text_encoder"),
    )
    diff_path = folder / f"{name}.diffusers.safetensors"
    with safe_open(str(diff_dir / "pytorch_lora_weights.safetensors"), "pt") as fh:  # re-save deterministically
        write_safetensors(diff_path, {k: fh.get_tensor(k) for k in fh.keys()}, fh.metadata())
    shutil.rmtree(diff_dir)
    return kohya_path, diff_path
