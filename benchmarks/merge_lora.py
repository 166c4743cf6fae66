"""Benchmark: switching between sets of 5 weighted LoRAs on one UNet — fused by ``merger.lora`` (fuse, sample,
restore the exact weights) vs kept as peft adapters and switched with diffusers ``set_adapters``.

Reports, in the same run: time per switch for each path, and the cost of one UNet forward pass with the
LoRAs fused vs active as adapters (adapters add work to every denoising step). Ratios are against the fuse
path. Runnable standalone::

    .venv/bin/python benchmarks/merge_lora.py                 # tiny UNet
    .venv/bin/python benchmarks/merge_lora.py --size sd15     # full-size SD1.5 UNet (random weights, ~3.4 GB fp32)
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass

import torch

from merger.lora import LoraDeltas, convert_deltas_to_peft, fuse_loras, normalize_lora, restore_weights

TINY = dict(sample_size=32, block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            attention_head_dim=8, norm_num_groups=32)
SD15 = dict(sample_size=64, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, cross_attention_dim=768,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            attention_head_dim=8)
TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


@dataclass
class Row:
    path: str
    setup_s: float
    switch_s: float
    step_s: float


def build_unet(size: str, dtype: torch.dtype, device: str) -> torch.nn.Module:
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**(SD15 if size == "sd15" else TINY))
    return unet.to(device=device, dtype=dtype).eval()


def random_loras(unet: torch.nn.Module, n: int, rank: int) -> list[LoraDeltas]:
    """``n`` random PEFT-layout LoRAs over the attention projections, normalised like any file."""
    gen = torch.Generator().manual_seed(1)
    modules = [(name, m) for name, m in unet.named_modules()
               if isinstance(m, torch.nn.Linear) and name.endswith(TARGETS)]
    loras = []
    for i in range(n):
        sd = {}
        for name, m in modules:
            sd[f"unet.{name}.lora_A.weight"] = torch.randn(rank, m.in_features, generator=gen) * 0.01
            sd[f"unet.{name}.lora_B.weight"] = torch.randn(m.out_features, rank, generator=gen) * 0.01
        loras.append(normalize_lora(sd, {}, f"lora{i}"))
    return loras


def weight_sets(n_loras: int, switches: int) -> list[list[float]]:
    gen = torch.Generator().manual_seed(2)
    return [torch.rand(n_loras, generator=gen).round(decimals=2).tolist() for _ in range(switches)]


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def forward_time(unet: torch.nn.Module, latent: int, device: str, dtype: torch.dtype, repeats: int) -> float:
    cfg = unet.config
    x = torch.randn(2, 4, latent, latent, device=device, dtype=dtype)
    ctx = torch.randn(2, 77, cfg.cross_attention_dim, device=device, dtype=dtype)
    t = torch.tensor([500, 500], device=device)
    times = []
    with torch.inference_mode():
        for _ in range(repeats):
            _sync(device)
            start = time.perf_counter()
            unet(x, t, ctx)
            _sync(device)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_loras(size: str = "tiny", n_loras: int = 5, rank: int = 8, switches: int = 5, device: str = "cpu",
                dtype: str = "fp32", repeats: int = 3, latent: int | None = None) -> list[Row]:
    """Time per LoRA-set switch (and per UNet step) for the fuse path and the ``set_adapters`` path."""
    latent = latent or (64 if size == "sd15" else 8)  # 64 = a 512×512 image
    torch_dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    unet = build_unet(size, torch_dtype, device)
    loras = random_loras(unet, n_loras, rank)
    sets = weight_sets(n_loras, switches)
    model = torch.nn.ModuleDict({"unet": unet})

    # Adapters are loaded once up front; both paths are then timed alternately on the same UNet so a
    # busy machine slows them alike (fused runs with the adapters disabled).
    start = time.perf_counter()
    names = []
    for i, lora in enumerate(loras):
        peft_sd = {k.removeprefix("unet."): v.to(torch_dtype) for k, v in convert_deltas_to_peft(lora).items()}
        unet.load_lora_adapter(peft_sd, adapter_name=f"a{i}", prefix=None)
        names.append(f"a{i}")
    setup = time.perf_counter() - start

    fuse_times, switch_times = [], []
    for weights in sets:
        unet.disable_lora()
        _sync(device)
        start = time.perf_counter()
        originals = fuse_loras(model, list(zip(loras, weights, strict=True)))  # fuse …
        restore_weights(model, originals)  # … and later put the exact weights back
        _sync(device)
        fuse_times.append(time.perf_counter() - start)
        unet.enable_lora()
        _sync(device)
        start = time.perf_counter()
        unet.set_adapters(names, weights)
        _sync(device)
        switch_times.append(time.perf_counter() - start)

    fused_steps, adapter_steps = [], []
    forward_time(unet, latent, device, torch_dtype, 1)  # warm-up
    for _ in range(repeats):
        unet.disable_lora()
        originals = fuse_loras(model, list(zip(loras, sets[0], strict=True)))
        fused_steps.append(forward_time(unet, latent, device, torch_dtype, 1))
        restore_weights(model, originals)
        unet.enable_lora()
        unet.set_adapters(names, sets[0])
        adapter_steps.append(forward_time(unet, latent, device, torch_dtype, 1))
    rows = [Row("fuse + exact restore", 0.0, statistics.median(fuse_times), statistics.median(fused_steps)),
            Row("peft adapters + set_adapters", setup, statistics.median(switch_times),
                statistics.median(adapter_steps))]
    return rows


def print_table(rows: list[Row], title: str, steps: int = 20) -> None:
    base = rows[0]
    print(f"\n{title}")
    print(f"{'path':<30} {'load once':>10} {'per switch':>11} {'ratio':>6} {'UNet step':>10} {'ratio':>6} "
          f"{f'switch+{steps} steps':>16} {'ratio':>6}")
    for r in rows:
        total, base_total = r.switch_s + steps * r.step_s, base.switch_s + steps * base.step_s
        print(f"{r.path:<30} {r.setup_s:>9.3f}s {r.switch_s:>10.4f}s {r.switch_s / base.switch_s:>6.2f} "
              f"{r.step_s:>9.4f}s {r.step_s / base.step_s:>6.2f} {total:>15.3f}s {total / base_total:>6.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=("tiny", "sd15"), default="tiny")
    parser.add_argument("--loras", type=int, default=5)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--switches", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default="fp32")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--latent", type=int, default=None, help="latent side for the step timing (64 = 512 px)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = bench_loras(args.size, args.loras, args.rank, args.switches, args.device, args.dtype, args.repeats,
                       args.latent)
    print_table(rows, f"{args.loras} LoRAs (rank {args.rank}) on a {args.size} UNet, {args.device} {args.dtype}, "
                      f"median of {args.switches} switches")


if __name__ == "__main__":
    main()
