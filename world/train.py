"""Training stages of the world, each a plain loop on two CPU cores.

The diffusion stages follow diffusers' ``train_text_to_image.py`` recipe: VAE latents × scaling factor,
``DDPMScheduler.add_noise``, epsilon prediction, MSE with min-SNR-γ weighting (``--snr_gamma 5``), 10 %
empty prompts for classifier-free guidance, AdamW with warmup. Latents are encoded once per data set and
reused (mean and std of the posterior, sampled per step as ``latent_dist.sample()`` would).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from world import grammar
from world.models import to_tensor

Progress = Callable[[int, int, float], None]


def _noop(step: int, total: int, loss: float) -> None:
    pass


@dataclass
class DataSet:
    specs: list[grammar.Spec]
    images: torch.Tensor  # uint8 NCHW

    def batch(self, idx: torch.Tensor) -> torch.Tensor:
        return self.images[idx].float().div(127.5).sub(1.0)


def make_data(n: int, seed: int, weights: dict[str, dict[str, float]] | None = None,
              mix: list[tuple[float, dict[str, dict[str, float]] | None]] | None = None) -> DataSet:
    """``n`` renders; ``mix`` = [(fraction, weights)] draws each image's attribute weights from a mixture."""
    rng = random.Random(seed)
    specs = []
    for _ in range(n):
        w = weights
        if mix:
            r, acc = rng.random(), 0.0
            for frac, mw in mix:
                acc += frac
                if r <= acc:
                    w = mw
                    break
        specs.append(grammar.sample_spec(rng, w))
    arr = np.stack([np.asarray(grammar.render(s), dtype=np.uint8) for s in specs])
    return DataSet(specs, torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous())


def _lr(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup))) * 0.9 + 0.1


def train_vae(vae: Any, data: DataSet, steps: int, seed: int, batch: int = 16, lr: float = 2e-3, crop: int = 32,
              decoder_only: bool = False, progress: Progress = _noop) -> None:
    """Reconstruction (MSE + L1) with a small KL term, as an LDM first stage without the GAN.
    ``decoder_only`` keeps the encoder (and so every latent the UNet trains on) fixed."""
    g = torch.Generator().manual_seed(seed)
    if decoder_only:
        vae.requires_grad_(False)
        vae.decoder.requires_grad_(True)
        vae.post_quant_conv.requires_grad_(True)
    opt = torch.optim.AdamW([p for p in vae.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr(s, steps, 50))
    vae.train()
    for step in range(steps):
        x = data.batch(torch.randint(0, len(data.specs), (batch,), generator=g))
        if crop:  # the VAE is fully convolutional: random crops train it at a quarter of the cost
            i, j = (int(v) for v in torch.randint(0, (x.shape[-1] - crop) // 8 + 1, (2,), generator=g) * 8)
            x = x[:, :, i:i + crop, j:j + crop]
        with torch.set_grad_enabled(not decoder_only):
            post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample(generator=g)).sample
        kl = post.kl().mean() / x[0].numel()
        loss = F.mse_loss(rec, x) + 0.5 * F.l1_loss(rec, x) + 1e-4 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        progress(step + 1, steps, float(loss.detach()))
    vae.eval()


@torch.no_grad()
def encode(vae: Any, data: DataSet, batch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std of every image (unscaled)."""
    means, stds = [], []
    for i in range(0, len(data.specs), batch):
        post = vae.encode(data.batch(torch.arange(i, min(i + batch, len(data.specs))))).latent_dist
        means.append(post.mean)
        stds.append(post.std)
    return torch.cat(means), torch.cat(stds)


@torch.no_grad()
def reconstruct(vae: Any, data: DataSet, batch: int = 128) -> DataSet:
    """The same pictures after a trip through the VAE (what every generated image goes through)."""
    out = []
    for i in range(0, len(data.specs), batch):
        x = data.batch(torch.arange(i, min(i + batch, len(data.specs))))
        rec = vae.decode(vae.encode(x).latent_dist.mean).sample
        out.append(((rec.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8))
    return DataSet(data.specs, torch.cat(out))


def concat(*sets: DataSet) -> DataSet:
    return DataSet([s for d in sets for s in d.specs], torch.cat([d.images for d in sets]))


def tokenize(tokenizer: Any, prompts: list[str]) -> torch.Tensor:
    return tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


def train_unet(pipe: Any, data: DataSet, latents: tuple[torch.Tensor, torch.Tensor], steps: int, seed: int,
               lr: float = 1e-3, batch: int = 64, train_text: bool = False, params: list[torch.nn.Parameter] | None = None,
               drop_defaults: float = 0.5, uncond: float = 0.1, snr_gamma: float = 5.0, warmup: int = 100,
               progress: Progress = _noop) -> None:
    """Text-to-image training of ``pipe.unet`` (and the text encoder when ``train_text``)."""
    from diffusers import DDPMScheduler
    from diffusers.training_utils import compute_snr

    noise_sched = DDPMScheduler.from_config(pipe.scheduler.config)
    g = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    unet, te, tok = pipe.unet, pipe.text_encoder, pipe.tokenizer
    if params is None:
        params = list(unet.parameters()) + (list(te.parameters()) if train_text else [])
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr(s, steps, warmup))
    scale = pipe.vae.config.scaling_factor
    mean, std = latents
    unet.train()
    te.train(train_text)
    for step in range(steps):
        idx = torch.randint(0, len(data.specs), (batch,), generator=g)
        z = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=g)) * scale
        prompts = ["" if rng.random() < uncond else grammar.full_prompt(data.specs[i], rng, drop_defaults)
                   for i in idx.tolist()]
        ids = tokenize(tok, prompts)
        with torch.set_grad_enabled(train_text):
            cond = te(ids)[0]
        noise = torch.randn(z.shape, generator=g)
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (batch,), generator=g)
        noisy = noise_sched.add_noise(z, noise, t)
        pred = unet(noisy, t, cond).sample
        snr = compute_snr(noise_sched, t)
        w = torch.stack([snr, snr_gamma * torch.ones_like(t, dtype=snr.dtype)], 1).min(1)[0] / snr
        loss = (F.mse_loss(pred.float(), noise.float(), reduction="none").mean((1, 2, 3)) * w).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        progress(step + 1, steps, float(loss.detach()))
    unet.eval()
    te.eval()


def train_reader(reader: torch.nn.Module, data: DataSet, steps: int, seed: int, batch: int = 64, lr: float = 2e-3,
                 progress: Progress = _noop) -> None:
    """Cross-entropy per attribute head, with light augmentation (noise, small blur of generated pictures)."""
    g = torch.Generator().manual_seed(seed)
    labels = {a: torch.tensor([grammar.VALUES[a].index(getattr(s, a)) for s in data.specs]) for a in grammar.ATTRIBUTES}
    opt = torch.optim.AdamW(reader.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr(s, steps, 30))
    reader.train()
    for step in range(steps):
        idx = torch.randint(0, len(data.specs), (batch,), generator=g)
        x = data.batch(idx)
        x = x + 0.06 * torch.randn(x.shape, generator=g)  # generated pictures are a little noisy
        out = reader(x)
        loss = sum(F.cross_entropy(out[a], labels[a][idx]) for a in grammar.ATTRIBUTES)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        progress(step + 1, steps, float(loss.detach()))
    reader.eval()


@torch.no_grad()
def reader_accuracy(reader: torch.nn.Module, data: DataSet) -> dict[str, float]:
    out = {a: [] for a in grammar.ATTRIBUTES}
    for i in range(0, len(data.specs), 256):
        idx = torch.arange(i, min(i + 256, len(data.specs)))
        pred = reader(data.batch(idx))
        for a in grammar.ATTRIBUTES:
            truth = torch.tensor([grammar.VALUES[a].index(getattr(data.specs[j], a)) for j in idx.tolist()])
            out[a].append((pred[a].argmax(1) == truth).float())
    return {a: float(torch.cat(v).mean()) for a, v in out.items()}


def train_clip(model: Any, tokenizer: Any, data: DataSet, steps: int, seed: int, batch: int = 64, lr: float = 1e-3,
               progress: Progress = _noop) -> None:
    """CLIP's symmetric contrastive loss on (render, prompt) pairs."""
    g = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr(s, steps, 50))
    model.train()
    for step in range(steps):
        idx = torch.randint(0, len(data.specs), (batch,), generator=g)
        prompts = [grammar.full_prompt(data.specs[i], rng, 0.5) for i in idx.tolist()]
        enc = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt")
        out = model(input_ids=enc.input_ids, attention_mask=enc.attention_mask, pixel_values=data.batch(idx),
                    return_loss=True)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        sched.step()
        progress(step + 1, steps, float(out.loss.detach()))
    model.eval()


@torch.no_grad()
def sample(pipe: Any, prompts: list[str], seeds: list[int], steps: int = 20, guidance: float = 4.0,
           batch: int = 32) -> list[Any]:
    """Images for (prompt, seed) pairs, batched through the diffusers pipeline."""
    images = []
    for i in range(0, len(prompts), batch):
        ps, ss = prompts[i:i + batch], seeds[i:i + batch]
        gens = [torch.Generator().manual_seed(s) for s in ss]
        out = pipe(ps, num_inference_steps=steps, guidance_scale=guidance, generator=gens, height=grammar.SIZE,
                   width=grammar.SIZE, output_type="pil")
        images.extend(out.images)
    return images


__all__ = ["DataSet", "encode", "make_data", "sample", "to_tensor", "tokenize", "train_clip", "train_reader",
           "train_unet", "train_vae", "reader_accuracy"]
