"""Calibration throughput: images/s and experts/hour, batched vs unbatched generation, in the same run.

Default: the tiny zoo on CPU (3 checkpoints + 2 LoRAs, tiny CLIP + aesthetic scorers). ``--full``: a
full-size SD1.5-architecture pipeline (random weights) at 512×512, 20 steps, on a GPU, with one checkpoint
expert (the base perturbed) and two LoRAs; scorers stay tiny (real CLIP-L weights are not available
offline), so the figures measure generation, which dominates calibration.

Each mode calibrates every expert from a cold base-image cache; "images" counts base + expert images.
Usage: ``python benchmarks/calibrate.py [--prompts 8] [--seeds 1] [--full]``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.settings import Settings  # noqa: E402
from core.types import Expert, ExpertFile, ExpertKind  # noqa: E402


def _expert(path: Path, name: str, kind: ExpertKind) -> Expert:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 24):
            h.update(chunk)
    sha = h.hexdigest()
    return Expert(id=f"local:{sha[:16]}", source="local", name=name, kind=kind, base_model="SD 1.5",
                  base_family="sd15", files=[ExpertFile(name=path.name, url=path.resolve().as_uri(), sha256=sha,
                                                        size_bytes=path.stat().st_size)])


def _full_zoo(root: Path, tiny_tokenizer: Path) -> tuple[Path, list[tuple[Path, ExpertKind]]]:
    """A random-weight SD1.5-size pipeline (diffusers dir), one perturbed checkpoint and two LoRAs."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from merger.checkpoint_layout import convert_diffusers_to_ldm
    from merger.families import get_family
    from tests.fakes.zoo import _write_lora_pair

    tokenizer = CLIPTokenizer.from_pretrained(str(tiny_tokenizer))
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)  # SD1.5 defaults
    vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        sample_size=512)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=768, intermediate_size=3072,
                                        num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=77,
                                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                        pad_token_id=tokenizer.pad_token_id, projection_dim=768))
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                          set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet, scheduler=sched,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    base_dir = root / "full-sd15"
    pipe.save_pretrained(base_dir, safe_serialization=True)
    family = get_family("sd15")
    configs = {"unet": dict(pipe.unet.config), "vae": dict(pipe.vae.config)}
    ldm = convert_diffusers_to_ldm(family, configs, {c: getattr(pipe, c).state_dict() for c in family.components})
    gen = torch.Generator().manual_seed(1)
    ckpt = root / "full-expert.safetensors"
    save_file({k: (v + 0.01 * torch.randn(v.shape, generator=gen, dtype=v.dtype)).half().contiguous()
               if v.is_floating_point() else v.contiguous() for k, v in ldm.items()}, str(ckpt))
    loras = [_write_lora_pair(pipe, root / "loras", f"full-lora-{i}", 8, 4.0, 300 + i)[0] for i in range(2)]
    return base_dir, [(ckpt, ExpertKind.checkpoint), *[(p, ExpertKind.lora) for p in loras]]


STAGES: dict[str, float] = {}


def _count_stages() -> None:
    """Sum the Generator's own per-stage timings, to show where calibration time goes."""
    from merger.generate import Generator

    original = Generator.generate

    def timed(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        result = original(self, *args, **kwargs)
        for k, v in result.timings.items():
            STAGES[k] = STAGES.get(k, 0.0) + v
        STAGES["calls"] = STAGES.get("calls", 0) + 1
        return result

    Generator.generate = timed  # type: ignore[method-assign]


def _measure(settings: Settings, ids: list[str], batch_size: int, n_images: int) -> dict[str, float]:
    from calibration.calibrate import calibrate_experts

    shutil.rmtree(settings.data_dir / "cache" / "calibration", ignore_errors=True)
    STAGES.clear()
    t = time.perf_counter()
    outcomes = calibrate_experts(settings, ids, batch_size=batch_size)
    wall = time.perf_counter() - t
    failed = [o for o in outcomes if o.status != "succeeded"]
    if failed:
        raise SystemExit(f"calibration failed: {failed[0].expert_id}: {failed[0].error}")
    stages = {k: round(v, 2) for k, v in STAGES.items()}
    stages["other"] = round(wall - sum(v for k, v in STAGES.items() if k != "calls"), 2)  # scoring, graph, SQL
    return {"batch_size": batch_size, "seconds": round(wall, 3), "images": n_images,
            "images_per_s": round(n_images / wall, 3), "experts_per_hour": round(len(ids) / wall * 3600, 1),
            "sample_images_per_s": round(n_images / max(STAGES.get("sample", 0.0), 1e-9), 3), "stages_s": stages}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--full", action="store_true", help="full-size SD1.5 UNet, 512 px, 20 steps (GPU only)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    import torch

    from graphdb.backends import store_session
    from tests.fakes.clip import build_tiny_clip
    from tests.fakes.zoo import build_tiny_zoo

    if args.full and not torch.cuda.is_available():
        raise SystemExit("--full needs a CUDA GPU")
    root = Path(tempfile.mkdtemp(prefix="bench-calibrate-"))
    try:
        zoo = build_tiny_zoo(root / "zoo")
        clip = build_tiny_clip(root / "scorers")
        if args.full:
            t = time.perf_counter()
            base, files = _full_zoo(root / "full", zoo.base_dir / "tokenizer")
            print(f"built full-size random SD1.5 zoo in {time.perf_counter() - t:.1f}s", file=sys.stderr)
            steps, size, device = 20, 512, "cuda"
        else:
            base = zoo.base_dir
            files = [*[(p, ExpertKind.checkpoint) for p in zoo.checkpoints],
                     *[(p, ExpertKind.lora) for p in zoo.loras_kohya]]
            steps, size, device = 4, 64, "cpu"
        settings = Settings(data_dir=root / "var", base_models={"sd15": str(base)}, scorer_paths=clip,
                            calib_steps=steps, calib_size=size, calib_seeds=args.seeds, calib_prompts=args.prompts,
                            device=device)
        experts = [_expert(p, p.stem, k) for p, k in files]
        with store_session(settings) as store:
            store.upsert_experts(experts)
        from crawler.downloads import ensure_local

        for e, (p, _) in zip(experts, files, strict=True):
            ensure_local(settings, e, from_file=p)  # local files enter the store only explicitly
        ids = [e.id for e in experts]
        n_images = (len(ids) + 1) * args.prompts * args.seeds

        from calibration.calibrate import calibrate_experts

        _count_stages()
        # warm-up over every expert: imports, embedder, ref prompts, kernels, and the cached checkpoint merges
        # (built once per expert in production too), so both modes measure calibration, not merging
        calibrate_experts(settings, ids, n_prompts=1)
        unbatched = _measure(settings, ids, 1, n_images)
        batched = _measure(settings, ids, args.prompts, n_images)
        report = {
            "mode": "full-sd15-512px-20steps" if args.full else "tiny-zoo-64px-4steps",
            "device": torch.cuda.get_device_name(0) if device == "cuda" else f"cpu x{torch.get_num_threads()}",
            "experts": len(ids), "prompts": args.prompts, "seeds": args.seeds,
            "unbatched": unbatched, "batched": batched,
            "batched_over_unbatched": round(batched["images_per_s"] / unbatched["images_per_s"], 3),
            "batched_over_unbatched_sampling": round(batched["sample_images_per_s"]
                                                     / unbatched["sample_images_per_s"], 3),
        }
        if args.json:
            print(json.dumps(report))
        else:
            print(f"{report['mode']} on {report['device']}: {len(ids)} experts x {args.prompts} prompts x "
                  f"{args.seeds} seeds ({n_images} images incl. base)")
            for name in ("unbatched", "batched"):
                r = report[name]
                print(f"  {name:9s} batch={r['batch_size']:<3d} {r['seconds']:8.2f}s  {r['images_per_s']:8.2f} img/s"
                      f"  {r['experts_per_hour']:10.1f} experts/h  sampling alone {r['sample_images_per_s']:.2f} img/s"
                      f"  stages {r['stages_s']}")
            print(f"  batched / unbatched images/s = {report['batched_over_unbatched']:.2f}x (end to end), "
                  f"{report['batched_over_unbatched_sampling']:.2f}x (sampling alone)")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
