"""Checkpoint-merge benchmark: streaming task arithmetic vs load-everything vs sd-mecha, same files, same run.

    .venv/bin/python benchmarks/merge.py              # 3 full-size SD1.5 UNets (≈1.7 GB fp16 each, ≈9 GB in /tmp)
    .venv/bin/python benchmarks/merge.py --size tiny  # smoke run (sd-mecha rows skipped: it needs real SD1 keys)

Inputs are written once (random fp16 weights, real SD1.5 UNet structure, original single-file key layout).
Each measurement runs in a fresh subprocess after the inputs' pages are evicted from the page cache
(``posix_fadvise(DONTNEED)``), and reports its own wall time (work only, imports excluded) and peak RSS.
Baselines: reading the inputs once, and the naive merge (``load_file`` everything, merge, ``save_file``).
Targets: peak RSS ≤ 0.6× one model; wall ≤ 0.8× sd-mecha and ≤ 1.3× read-once.
The LoRA half (fuse vs set_adapters) lives in ``benchmarks/merge_lora.py`` (merger-lora) and runs here if present.
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

SD15_UNET = dict(  # the published runwayml/stable-diffusion-v1-5 unet/config.json (structure fields)
    sample_size=64, in_channels=4, out_channels=4, center_input_sample=False, flip_sin_to_cos=True, freq_shift=0,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, downsample_padding=1, mid_block_scale_factor=1,
    act_fn="silu", norm_num_groups=32, norm_eps=1e-5, cross_attention_dim=768, attention_head_dim=8,
)
TINY_UNET = dict(
    sample_size=32, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32,
)
WEIGHTS = (0.5, 0.3)  # θ = θ_base + 0.5 (θ_1 − θ_base) + 0.3 (θ_2 − θ_base)


# ---------------------------------------------------------------- inputs

def write_inputs(workdir: Path, size: str) -> list[Path]:
    """Base + 2 experts: random fp16 UNets in the original layout, written tensor by tensor."""
    import torch
    from diffusers import UNet2DConditionModel

    from merger.checkpoint_layout import unet_key_to_ldm
    from merger.merge_writer import StreamingSafetensorsWriter

    config = SD15_UNET if size == "full" else TINY_UNET
    with torch.device("meta"):
        unet = UNet2DConditionModel(**config)
    shapes = {"model.diffusion_model." + unet_key_to_ldm(k, dict(unet.config)): tuple(v.shape)
              for k, v in unet.state_dict().items()}
    names = sorted(shapes)
    paths = []
    for i, name in enumerate(("base", "expert1", "expert2")):
        path = workdir / f"{name}.safetensors"
        paths.append(path)
        if path.is_file():
            continue
        gen = torch.Generator().manual_seed(i)
        entries = [(n, "F16", shapes[n]) for n in names]
        with StreamingSafetensorsWriter(path, entries, {"format": "pt"}) as writer:
            for n in names:
                writer.write(n, (torch.randn(shapes[n], generator=gen) * 0.05).half())
    return paths


def evict(paths: list[Path]) -> None:
    """Drop the files' pages from the page cache so every run starts cold."""
    for path in paths:
        for p in ([path] if path.is_file() else [q for q in path.rglob("*") if q.is_file()]):
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd) if os.access(p, os.W_OK) else None
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


# ---------------------------------------------------------------- one measurement (runs in a subprocess)

def run_case(case: str, inputs: list[Path], out: Path) -> None:
    import torch  # noqa: F401  (imported before the clock starts, as in every case)

    base, e1, e2 = inputs
    start = time.perf_counter()
    if case == "read_once":
        buf = bytearray(64 << 20)
        for p in inputs:
            with p.open("rb", buffering=0) as fh:
                while fh.readinto(buf):
                    pass
    elif case == "naive":
        from safetensors.torch import load_file, save_file

        sds = [load_file(p) for p in inputs]
        merged = {}
        for key, b in sds[0].items():
            acc = b.float()
            for w, sd in zip(WEIGHTS, sds[1:], strict=True):
                acc = acc + w * (sd[key].float() - b.float())
            merged[key] = acc.half()
        save_file(merged, str(out))
    elif case == "ours":
        from merger.merge import merge
        from merger.recipe import MergeRecipe

        merge(MergeRecipe(str(base), ((str(e1), WEIGHTS[0]), (str(e2), WEIGHTS[1])), "task_arithmetic",
                          dtype="fp16", family="sd15"), out)
    elif case == "ours_weighted_average":
        from merger.merge import merge
        from merger.recipe import MergeRecipe

        merge(MergeRecipe(str(base), ((str(e1), 0.5),), "weighted_average", dtype="fp16", family="sd15"), out)
    elif case in ("sd_mecha", "sd_mecha_weighted_sum"):
        import functools

        import sd_mecha
        import tqdm

        sd_mecha.set_log_level("ERROR") if hasattr(sd_mecha, "set_log_level") else None
        mb, m1, m2 = (sd_mecha.model(str(p), config="sd1-ldm") for p in inputs)
        if case == "sd_mecha":
            # θ_b + w1 (θ_1 − θ_b) + w2 (θ_2 − θ_b) with sd-mecha's own merge methods. Its public
            # ``add_difference`` wrapper cannot nest in 1.1.8 (the inner node has no merge space yet).
            from sd_mecha.extensions.builtin.merge_methods import linear

            step = linear.add_difference(mb, sd_mecha.subtract(m1, mb), alpha=WEIGHTS[0])
            recipe = linear.add_difference(step, sd_mecha.subtract(m2, mb), alpha=WEIGHTS[1])
        else:
            recipe = sd_mecha.weighted_sum(mb, m1, alpha=0.5)
        sd_mecha.merge(recipe, output=str(out), merge_dtype=torch.float32, output_dtype=torch.float16,
                       merge_device="cpu", output_device="cpu", strict_mandatory_keys=False, check_extra_keys=False,
                       tqdm=functools.partial(tqdm.tqdm, disable=True))
    else:
        raise SystemExit(f"unknown case {case}")
    wall = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    print(json.dumps({"case": case, "wall_s": wall, "peak_rss": peak}))


# ---------------------------------------------------------------- driver

def measure(case: str, inputs: list[Path], workdir: Path) -> dict:
    out = workdir / f"out-{case}.safetensors"
    evict(inputs)
    proc = subprocess.run(
        [sys.executable, __file__, "--case", case, "--workdir", str(workdir)],
        capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=1800,
    )
    if out.exists():
        out.unlink()
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"case": case, "error": " | ".join(tail)[:300]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=("full", "tiny"), default="full")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--keep", action="store_true", help="keep the generated inputs")
    parser.add_argument("--cases", default="", help="comma-separated subset of cases to run")
    parser.add_argument("--skip-lora", action="store_true", help="skip the LoRA half (benchmarks/merge_lora.py)")
    parser.add_argument("--case", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--write-inputs", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--lora-half", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.lora_half:
        _run_lora_half(args.size)
        return
    if args.write_inputs:
        write_inputs(args.workdir, args.size)
        return
    if args.case:
        inputs = [args.workdir / f"{n}.safetensors" for n in ("base", "expert1", "expert2")]
        run_case(args.case, inputs, args.workdir / f"out-{args.case}.safetensors")
        return

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix=f"diffgraph-merge-bench-{args.size}-"))
    workdir.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    # In a child process: the driver stays free of torch, because Linux children inherit the parent's peak
    # RSS through fork and would all report at least the driver's size.
    subprocess.run([sys.executable, __file__, "--write-inputs", "--size", args.size, "--workdir", str(workdir)],
                   check=True)
    inputs = [workdir / f"{n}.safetensors" for n in ("base", "expert1", "expert2")]
    model_bytes = inputs[0].stat().st_size
    print(f"inputs: 3 × {model_bytes / 1e9:.2f} GB UNets ({args.size}) in {workdir} "
          f"(written in {time.perf_counter() - t:.1f} s)", flush=True)
    cases = ["read_once", "naive", "ours"]
    if args.size == "full":
        cases += ["sd_mecha", "ours_weighted_average", "sd_mecha_weighted_sum"]
    if args.cases:
        cases = [c for c in args.cases.split(",") if c]
    try:
        rows = {}
        for case in cases:
            rows[case] = measure(case, inputs, workdir)
            print(f"  {case}: {rows[case]}", flush=True)
        report(rows, model_bytes)
        if not args.skip_lora:
            subprocess.run([sys.executable, __file__, "--lora-half", "--size", args.size], check=False)
    finally:
        if not args.keep and args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)


def report(rows: dict[str, dict], model_bytes: int) -> None:
    read_once = rows.get("read_once", {}).get("wall_s")
    print(f"\n{'case':<24}{'wall s':>9}{'peak RSS GB':>13}{'RSS/model':>11}{'wall/read-once':>16}")
    for case, row in rows.items():
        if "error" in row:
            print(f"{case:<24}  failed: {row['error']}")
            continue
        ratio = f"{row['wall_s'] / read_once:.2f}" if read_once else "-"
        print(f"{case:<24}{row['wall_s']:>9.2f}{row['peak_rss'] / 1e9:>13.2f}{row['peak_rss'] / model_bytes:>11.2f}"
              f"{ratio:>16}")
    ours, mecha, naive = rows.get("ours", {}), rows.get("sd_mecha", {}), rows.get("naive", {})
    print()
    if "wall_s" in ours:
        print(f"ours peak RSS / one model: {ours['peak_rss'] / model_bytes:.2f} (target ≤ 0.6)")
        if read_once:
            print(f"ours wall / read-once:     {ours['wall_s'] / read_once:.2f} (target ≤ 1.3)")
        if "wall_s" in mecha:
            print(f"ours wall / sd-mecha:      {ours['wall_s'] / mecha['wall_s']:.2f} (target ≤ 0.8); "
                  f"RSS ratio {ours['peak_rss'] / mecha['peak_rss']:.2f}")
        if "wall_s" in naive:
            print(f"ours wall / naive:         {ours['wall_s'] / naive['wall_s']:.2f}; "
                  f"RSS ratio {ours['peak_rss'] / naive['peak_rss']:.2f}")
    wa, ws = rows.get("ours_weighted_average", {}), rows.get("sd_mecha_weighted_sum", {})
    if "wall_s" in wa and "wall_s" in ws:
        print(f"weighted average (2 models) ours / sd-mecha weighted_sum: wall {wa['wall_s'] / ws['wall_s']:.2f}, "
              f"RSS {wa['peak_rss'] / ws['peak_rss']:.2f}")


def _run_lora_half(size: str) -> None:
    """HOOK — merger-lora's half of the benchmark (fuse vs ``set_adapters``), from ``benchmarks/merge_lora.py``."""
    try:
        from benchmarks.merge_lora import bench_loras, print_table
    except ImportError:
        print("\n(LoRA benchmark not present: benchmarks/merge_lora.py)")
        return
    lora_size = "sd15" if size == "full" else "tiny"
    print_table(bench_loras(size=lora_size), f"5 LoRAs on a {lora_size} UNet: fuse vs set_adapters")


if __name__ == "__main__":
    main()
