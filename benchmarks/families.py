"""SDXL and FLUX.1 benchmark: streaming merges at (near) full size, peak memory beside a plain read of the same
inputs in the same run, and one sampling step per family.

    .venv/bin/python benchmarks/families.py                  # full size on CUDA when present, else reduced on CPU
    .venv/bin/python benchmarks/families.py --size reduced   # force the CPU size
    .venv/bin/python benchmarks/families.py --workdir /big/disk --keep

Inputs are random weights in the real original (single-file) key layouts: three SDXL UNets
(``model.diffusion_model.*``, fp16) and three FLUX.1 transformers (bare BFL keys, bf16). Each measurement runs in
a fresh subprocess after the inputs' pages are evicted, and reports its own wall time and peak RSS (and peak
CUDA memory for sampling). Sizes:

* ``full``: the published SDXL base UNet (2.6 B parameters, 5.1 GB fp16 each); FLUX.1 at full width (3072)
  with ``--flux-blocks`` double/single blocks (default 4/8 of 19/38, so three inputs and the output fit a
  64 GB disk); sampling builds full-size random pipelines on the GPU.
* ``reduced``: SDXL's channels and block structure with one transformer layer per block (≈0.6 GB fp16 each);
  FLUX at width 1024 with 2/4 blocks; sampling uses the tiny test pipelines.

Target: the SDXL UNet three-model merge peaks at ≤ 0.6× one model's size in RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SDXL_UNET = dict(  # stabilityai/stable-diffusion-xl-base-1.0 unet/config.json (structure fields)
    sample_size=128, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280), layers_per_block=2,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816, norm_num_groups=32,
)
REDUCED_SDXL_UNET = {**SDXL_UNET, "transformer_layers_per_block": (1, 1, 1)}
WEIGHTS = (0.5, 0.3)


def _sizes(size: str, flux_blocks: tuple[int, int]) -> tuple[dict, dict]:
    if size == "full":
        return SDXL_UNET, dict(inner=3072, double=flux_blocks[0], single=flux_blocks[1])
    return REDUCED_SDXL_UNET, dict(inner=1024, double=2, single=4)


# ---------------------------------------------------------------- inputs

def write_inputs(workdir: Path, size: str, flux_blocks: tuple[int, int], families: set[str]) -> None:
    import torch
    from diffusers import UNet2DConditionModel

    from merger.checkpoint_layout import flux_segments, unet_key_to_ldm
    from merger.merge_writer import StreamingSafetensorsWriter

    unet_config, flux = _sizes(size, flux_blocks)
    with torch.device("meta"):
        unet = UNet2DConditionModel(**unet_config)
    sdxl = {"model.diffusion_model." + unet_key_to_ldm(k, dict(unet.config)): tuple(v.shape)
            for k, v in unet.state_dict().items()}
    inner, mlp = flux["inner"], 4 * flux["inner"]
    flux_shapes: dict[str, tuple[int, ...]] = {}
    cols = {"img_in": 64, "txt_in": 4096, "vector_in.in_layer": 768, "time_in.in_layer": 256,
            "guidance_in.in_layer": 256, "linear2": inner + mlp, "img_mlp.2": mlp, "txt_mlp.2": mlp}
    for seg in flux_segments("", flux["double"], flux["single"], inner, mlp, guidance=True):
        rows = seg.orig_rows[1] if seg.orig_rows else None
        stem = seg.original.rsplit(".", 1)[0]
        n_in = next((v for k, v in cols.items() if stem.endswith(k)), inner)
        if rows is None:
            rows = _flux_rows(seg.key, inner, mlp)
        shape = (rows,) if seg.original.endswith(("bias", "scale")) else (rows, n_in)
        if seg.original.endswith("scale"):
            shape = (inner // 24,)  # qk-norm scales: one head dim (128 at full width)
        prev = flux_shapes.get(seg.original)
        flux_shapes[seg.original] = shape if prev is None or shape[0] >= prev[0] else prev
    for family, shapes, dtype, stored in (("sdxl", sdxl, torch.float16, "F16"),
                                          ("flux", flux_shapes, torch.bfloat16, "BF16")):
        if family not in families:
            continue
        names = sorted(shapes)
        for i, name in enumerate(("base", "expert1", "expert2")):
            path = workdir / f"{family}-{name}.safetensors"
            if path.is_file():
                continue
            gen = torch.Generator().manual_seed(i)
            with StreamingSafetensorsWriter(path, [(n, stored, shapes[n]) for n in names], {"format": "pt"}) as w:
                for n in names:
                    w.write(n, (torch.randn(shapes[n], generator=gen) * 0.05).to(dtype))


def _flux_rows(key: str, inner: int, mlp: int) -> int:
    if "norm1" in key and "linear" in key:
        return 6 * inner
    if key.startswith("single_transformer_blocks") and "norm.linear" in key:
        return 3 * inner
    if "ff.net.0" in key or "ff_context.net.0" in key:
        return mlp
    if key.startswith("proj_out"):
        return 64
    return inner


def evict(paths: list[Path]) -> None:
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


# ---------------------------------------------------------------- one measurement (in a subprocess)

def run_case(case: str, workdir: Path, device: str) -> dict:
    import torch

    family = case.split("_", 1)[0]
    inputs = [workdir / f"{family}-{n}.safetensors" for n in ("base", "expert1", "expert2")]
    out = workdir / f"out-{case}.safetensors"
    extra: dict = {}
    start = time.perf_counter()
    if case.endswith("_read"):
        from merger.safe_load import open_weights

        for p in inputs:  # a plain read of every tensor, the way the merge reads them (pread)
            with open_weights(p) as wf:
                for key in wf.keys():
                    wf.get(key)
    elif case.endswith("_merge"):
        from merger.merge import merge
        from merger.recipe import MergeRecipe

        merge(MergeRecipe(str(inputs[0]), ((str(inputs[1]), WEIGHTS[0]), (str(inputs[2]), WEIGHTS[1])),
                          "task_arithmetic", dtype="fp16" if family == "sdxl" else "bf16", family=family), out)
        extra["out_bytes"] = out.stat().st_size
        out.unlink()
    elif case.endswith("_sample"):
        extra.update(_sample_one_step(family, device, workdir))
    wall = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if device.startswith("cuda"):
        extra["cuda_peak"] = torch.cuda.max_memory_allocated()
    return {"case": case, "wall_s": wall, "peak_rss": peak, **extra}


def _sample_one_step(family: str, device: str, workdir: Path) -> dict:
    import torch

    from tests.fakes.families import build_tiny_flux_pipeline, build_tiny_sdxl_pipeline

    full = device.startswith("cuda")
    if family == "sdxl":
        pipe = _full_sdxl(workdir) if full else build_tiny_sdxl_pipeline(workdir / "tok")
        size = 1024 if full else 32
    else:
        pipe = _full_flux(workdir) if full else build_tiny_flux_pipeline(workdir / "tok")
        size = 1024 if full else 32
    dtype = torch.float16 if full else torch.float32
    pipe = pipe.to(device, dtype)
    t = time.perf_counter()
    pipe("a red fox in the snow", num_inference_steps=1, width=size, height=size, output_type="latent")
    return {"step_s": time.perf_counter() - t, "size": size}


def _full_sdxl(workdir: Path):
    import torch
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from tests.fakes.zoo import write_tiny_tokenizer

    tok = CLIPTokenizer.from_pretrained(str(write_tiny_tokenizer(workdir / "tok")))
    with torch.device("cuda"):
        unet = UNet2DConditionModel(**SDXL_UNET)
        vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
        te1 = CLIPTextModel(CLIPTextConfig(vocab_size=len(tok), hidden_size=768, intermediate_size=3072,
                                           num_hidden_layers=12, num_attention_heads=12))
        te2 = CLIPTextModelWithProjection(CLIPTextConfig(vocab_size=len(tok), hidden_size=1280,
                                                         intermediate_size=5120, num_hidden_layers=32,
                                                         num_attention_heads=20, projection_dim=1280))
    return StableDiffusionXLPipeline(vae=vae, text_encoder=te1, text_encoder_2=te2, tokenizer=tok, tokenizer_2=tok,
                                     unet=unet, scheduler=EulerDiscreteScheduler())


def _full_flux(workdir: Path):
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTokenizer,
        T5Config,
        T5EncoderModel,
        T5TokenizerFast,
    )

    from tests.fakes.families import write_tiny_t5_tokenizer
    from tests.fakes.zoo import write_tiny_tokenizer

    tok = CLIPTokenizer.from_pretrained(str(write_tiny_tokenizer(workdir / "tok")))
    tok2 = T5TokenizerFast.from_pretrained(str(write_tiny_t5_tokenizer(workdir / "t5")))
    with torch.device("cuda"):
        transformer = FluxTransformer2DModel(guidance_embeds=True)  # the published FLUX.1-dev structure
        vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=16,
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                            use_quant_conv=False, use_post_quant_conv=False)
        te = CLIPTextModel(CLIPTextConfig(vocab_size=len(tok), hidden_size=768, intermediate_size=3072,
                                          num_hidden_layers=12, num_attention_heads=12))
        te2 = T5EncoderModel(T5Config(vocab_size=len(tok2), d_model=4096, d_kv=64, d_ff=10240, num_layers=24,
                                      num_heads=64, is_encoder_decoder=False, use_cache=False))
    return FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=te, tokenizer=tok,
                        text_encoder_2=te2, tokenizer_2=tok2, transformer=transformer)


# ---------------------------------------------------------------- driver

def measure(case: str, workdir: Path, device: str) -> dict:
    family = case.split("_", 1)[0]
    evict([workdir / f"{family}-{n}.safetensors" for n in ("base", "expert1", "expert2")])
    proc = subprocess.run([sys.executable, __file__, "--case", case, "--workdir", str(workdir), "--device", device],
                          capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=3600)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"case": case, "error": " | ".join(tail)[:400]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=("auto", "full", "reduced"), default="auto")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--flux-blocks", default="4,8", help="full size: FLUX double,single blocks (19,38 = all)")
    parser.add_argument("--cases", default="", help="comma-separated subset")
    parser.add_argument("--case", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--device", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--write-inputs", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--families", default="sdxl,flux", help=argparse.SUPPRESS)
    args = parser.parse_args()
    blocks = tuple(int(x) for x in args.flux_blocks.split(","))
    if args.case:
        print(json.dumps(run_case(args.case, args.workdir, args.device)))
        return
    if args.write_inputs:
        write_inputs(args.workdir, args.size, blocks, set(args.families.split(",")))  # type: ignore[arg-type]
        return
    # the driver stays free of torch (children inherit its peak RSS); ask a child for the device
    probe = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.is_available())"],
                           capture_output=True, text=True)
    cuda = probe.stdout.strip() == "True"
    device = "cuda" if cuda else "cpu"
    size = args.size if args.size != "auto" else ("full" if cuda else "reduced")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix=f"diffgraph-families-{size}-"))
    workdir.mkdir(parents=True, exist_ok=True)
    cases = ["sdxl_read", "sdxl_merge", "flux_read", "flux_merge", "sdxl_sample", "flux_sample"]
    if args.cases:
        cases = [c for c in cases if c in args.cases.split(",")]
    families = {c.split("_", 1)[0] for c in cases if not c.endswith("_sample")}
    t = time.perf_counter()
    subprocess.run([sys.executable, __file__, "--write-inputs", "--size", size, "--workdir", str(workdir),
                    "--flux-blocks", args.flux_blocks, "--families", ",".join(sorted(families)) or "none"],
                   check=True)
    size_of = lambda f: (workdir / f"{f}-base.safetensors").stat().st_size if f in families else 1  # noqa: E731
    sdxl_bytes, flux_bytes = size_of("sdxl"), size_of("flux")
    print(f"{size} on {device}: 3 × SDXL UNet {sdxl_bytes / 1e9:.2f} GB fp16, 3 × FLUX transformer "
          f"{flux_bytes / 1e9:.2f} GB bf16 in {workdir} (written in {time.perf_counter() - t:.0f} s)", flush=True)
    results = {c: measure(c, workdir, device) for c in cases}
    print(f"\n{'case':<12} {'wall s':>8} {'peak RSS GB':>12} {'× one model':>12} {'× plain read':>13}  note")
    for case, r in results.items():
        if "error" in r:
            print(f"{case:<12} error: {r['error']}")
            continue
        family = case.split("_", 1)[0]
        one = sdxl_bytes if family == "sdxl" else flux_bytes
        read = results.get(f"{family}_read", {})
        ratio_read = f"{r['peak_rss'] / read['peak_rss']:.2f}" if read.get("peak_rss") else ""
        note = ""
        if case == "sdxl_merge":
            note = f"target ≤ 0.6× one model: {'met' if r['peak_rss'] <= 0.6 * one else 'NOT met'}"
        if case.endswith("_merge") and read.get("wall_s"):
            note += f"; wall {r['wall_s'] / read['wall_s']:.2f}× the plain read"
        if "step_s" in r:
            note = f"one step at {r['size']} px: {r['step_s']:.2f} s"
            if "cuda_peak" in r:
                note += f", CUDA peak {r['cuda_peak'] / 1e9:.1f} GB"
        print(f"{case:<12} {r['wall_s']:>8.1f} {r['peak_rss'] / 1e9:>12.2f} {r['peak_rss'] / one:>12.2f} "
              f"{ratio_read:>13}  {note}")
    if not args.keep and args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
