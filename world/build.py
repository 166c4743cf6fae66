"""``diffgraph world build``: retrain the whole world from scratch, seeded, stage by stage.

Stages write fp32 intermediates under ``<out>/.work`` (a rerun resumes after the last finished stage) and the
shipped fp16 files under ``<out>``; ``world.json`` records each stage's wall time and every shipped file's
SHA-256.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from world import experts as experts_mod
from world import grammar, models, train


@dataclass(frozen=True)
class Budget:
    """Step counts of each stage (``quick`` is for smoke tests: seconds, useless weights)."""

    vae_data: int = 4000
    vae_steps: int = 1500
    decoder_steps: int = 1000
    base_data: int = 10000
    base_steps: int = 1500
    reader_data: int = 8000
    reader_steps: int = 500
    clip_steps: int = 300
    expert_data: int = 1500
    expert_steps: int = 300
    lora_steps: int = 300
    batch: int = 64


QUICK = Budget(vae_data=64, vae_steps=2, decoder_steps=2, base_data=64, base_steps=2, reader_data=64, reader_steps=2, clip_steps=2,
               expert_data=32, expert_steps=1, lora_steps=1, batch=8)

Bar = Callable[[str, int], Callable[[int, int, float], None]]


def _bar(stage: str, total: int) -> Callable[[int, int, float], None]:
    """One bar per stage, redrawn in place; when stages run side by side (``DIFFGRAPH_WORLD_BAR_LINES``, set by
    the parallel builder) each redraw is its own line, every 10 %, so bars do not overwrite each other."""
    t0 = time.time()
    lines = os.environ.get("DIFFGRAPH_WORLD_BAR_LINES") == "1"
    every = max(1, total // (10 if lines else 50))

    def show(step: int, n: int, loss: float) -> None:
        if step == n or step % every == 0:
            rate = step / max(1e-9, time.time() - t0)
            width = 30
            done = int(width * step / n)
            text = f"{stage:<22} [{'#' * done}{'.' * (width - done)}] {step}/{n} loss {loss:.4f} {rate:.2f} it/s"
            print(text if lines else "\r" + text, end="\n" if lines or step == n else "", flush=True)

    return show


class Builder:
    def __init__(self, out: Path, seed: int = 0, budget: Budget = Budget(), bar: Bar = _bar) -> None:
        self.out, self.seed, self.budget, self.bar = Path(out), seed, budget, bar
        self.work = self.out / ".work"
        self.work.mkdir(parents=True, exist_ok=True)
        self.timings: dict[str, float] = {}
        tf = self.work / "timings.json"
        if tf.is_file():
            self.timings = json.loads(tf.read_text())

    def done(self, name: str) -> bool:
        return (self.work / f"{name}.done").is_file()

    def run_stage(self, name: str) -> float:
        """Run one stage (unless already done); its wall time, which the caller records."""
        if self.done(name):
            return 0.0
        t0 = time.time()
        self.stages()[name][1]()
        return round(time.time() - t0, 1)

    def record(self, name: str, seconds: float) -> None:
        """Mark a stage done with its wall time (only the coordinating process writes these)."""
        self.timings[name] = seconds
        (self.work / "timings.json").write_text(json.dumps(self.timings, indent=1))
        (self.work / f"{name}.done").write_text("ok")

    # ------------------------------------------------------------ stages
    def tokenizer(self) -> None:
        models.write_tokenizer(self.work / "tokenizer")

    def pipeline(self, which: str = "base", tuned_decoder: bool = True) -> Any:
        """A saved pipeline (``init`` after the VAE stage, ``base`` after the base stage), with the decoder stage's
        VAE when it has run."""
        from diffusers import StableDiffusionPipeline

        pipe = StableDiffusionPipeline.from_pretrained(str(self.work / which), safety_checker=None,
                                                       requires_safety_checker=False, local_files_only=True)
        if tuned_decoder and (self.work / "vae.safetensors").is_file():
            from safetensors.torch import load_file

            pipe.vae.load_state_dict(load_file(str(self.work / "vae.safetensors")))
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def vae(self) -> None:
        b = self.budget
        pipe = models.new_pipeline(self.work / "tokenizer", self.seed)
        data = train.make_data(b.vae_data, self.seed + 1)
        train.train_vae(pipe.vae, data, b.vae_steps, self.seed + 2, progress=self.bar("vae", b.vae_steps))
        mean, _ = train.encode(pipe.vae, data)
        pipe.vae.register_to_config(scaling_factor=float(1.0 / mean.std()))
        pipe.save_pretrained(self.work / "init")

    def decoder(self) -> None:
        """More decoder training with the encoder fixed: runs beside the base stage (same latents)."""
        from safetensors.torch import save_file

        b = self.budget
        pipe = self.pipeline("init", tuned_decoder=False)
        data = train.make_data(b.vae_data, self.seed + 12)
        train.train_vae(pipe.vae, data, b.decoder_steps, self.seed + 13, lr=1e-3, decoder_only=True,
                        progress=self.bar("vae decoder", b.decoder_steps))
        save_file(pipe.vae.state_dict(), str(self.work / "vae.safetensors"))

    def base(self) -> None:
        b = self.budget
        torch.manual_seed(self.seed)
        pipe = self.pipeline("init")
        data = train.make_data(b.base_data, self.seed + 3, grammar.BASE_WEIGHTS)
        lat = train.encode(pipe.vae, data)
        train.train_unet(pipe, data, lat, b.base_steps, self.seed + 4, lr=1e-3, batch=b.batch, train_text=True,
                         progress=self.bar("base", b.base_steps))
        pipe.save_pretrained(self.work / "base")

    def reader(self) -> None:
        """The reader on clean renders (needs nothing else, so it trains beside the VAE)."""
        from safetensors.torch import save_file

        b = self.budget
        torch.manual_seed(self.seed + 5)
        reader = models.Reader()
        data = train.make_data(b.reader_data, self.seed + 6)
        train.train_reader(reader, data, b.reader_steps, self.seed + 7, progress=self.bar("reader", b.reader_steps))
        save_file(reader.state_dict(), str(self.work / "reader-clean.safetensors"))

    def reader_on_vae(self) -> None:
        """Fine-tune the reader on renders half of which went through the world's VAE first: generated images
        always do, and the reader must read them as well as clean renders. Then measure it on held-out renders."""
        from safetensors.torch import load_file, save_file

        b = self.budget
        reader = models.Reader()
        reader.load_state_dict(load_file(str(self.work / "reader-clean.safetensors")))
        vae = self.pipeline("init").vae
        n = max(32, b.reader_data // 4)
        data = train.concat(train.make_data(n, self.seed + 15),
                            train.reconstruct(vae, train.make_data(n, self.seed + 14)))
        steps = max(1, b.reader_steps // 3)
        train.train_reader(reader, data, steps, self.seed + 16, lr=1e-3, progress=self.bar("reader on VAE", steps))
        held = train.make_data(max(64, b.reader_data // 8), self.seed + 8)
        acc = train.reader_accuracy(reader, held)
        acc_rec = train.reader_accuracy(reader, train.reconstruct(vae, held))
        save_file(reader.state_dict(), str(self.work / "reader.safetensors"))
        (self.work / "reader_accuracy.json").write_text(json.dumps({"renders": acc, "vae_roundtrip": acc_rec},
                                                                   indent=1))
        print("reader held-out accuracy:", acc, "after the VAE:", acc_rec, flush=True)

    def clip(self) -> None:
        from transformers import CLIPModel, CLIPTokenizer

        b = self.budget
        tok = CLIPTokenizer.from_pretrained(str(self.work / "tokenizer"))
        torch.manual_seed(self.seed + 9)
        model = CLIPModel(models.clip_config(tok))
        data = train.make_data(b.reader_data, self.seed + 10)
        train.train_clip(model, tok, data, b.clip_steps, self.seed + 11, progress=self.bar("clip", b.clip_steps))
        model.save_pretrained(self.work / "clip")
        tok.save_pretrained(self.work / "clip")

    def _expert_pipe(self) -> Any:
        """The base pipeline with a fresh copy of its UNet (loaded once per process)."""
        import copy

        if not hasattr(self, "_base_pipe"):
            self._base_pipe = self.pipeline("base")
            self._base_unet = copy.deepcopy(self._base_pipe.unet)
        self._base_pipe.unet = copy.deepcopy(self._base_unet)
        return self._base_pipe

    def expert(self, spec: experts_mod.ExpertSpec, index: int) -> None:
        b = self.budget
        pipe = self._expert_pipe()
        data = train.make_data(b.expert_data, self.seed + 100 + index, mix=experts_mod.training_weights(spec))
        lat = train.encode(pipe.vae, data)
        if spec.kind == "checkpoint" or spec.extracted:
            steps = spec.steps(b.expert_steps)
            train.train_unet(pipe, data, lat, steps, self.seed + 200 + index, lr=1e-3, batch=b.batch // 2,
                             warmup=20, progress=self.bar(spec.name, steps))
            from safetensors.torch import save_file

            save_file(pipe.unet.state_dict(), str(self.work / f"{spec.name}.unet.safetensors"))
            return
        from peft import LoraConfig, get_peft_model_state_dict

        pipe.unet.requires_grad_(False)
        cfg = LoraConfig(r=spec.rank, lora_alpha=spec.rank, init_lora_weights="gaussian",
                         target_modules=experts_mod.LORA_TARGETS)
        pipe.unet.add_adapter(cfg)
        params = [p for p in pipe.unet.parameters() if p.requires_grad]
        steps = spec.steps(b.lora_steps)
        train.train_unet(pipe, data, lat, steps, self.seed + 200 + index, lr=3e-3, batch=b.batch // 2, params=params,
                         warmup=20, progress=self.bar(spec.name, steps))
        from safetensors.torch import save_file

        save_file(get_peft_model_state_dict(pipe.unet), str(self.work / f"{spec.name}.lora.safetensors"))
        (self.work / f"{spec.name}.lora.json").write_text(json.dumps(cfg.to_dict(), default=list))

    def export(self) -> None:
        """Write the shipped fp16 files into ``out`` (everything but ``.work``)."""
        from safetensors.torch import load_file, save_file
        from transformers import CLIPModel

        from world import export, paths
        from world.prompts import speciality_prompts

        pipe = self.pipeline("base")
        base_file = self.out / f"{paths.BASE_NAME}.safetensors"
        export.write_checkpoint(pipe, base_file, paths.BASE_NAME)
        export.write_config_dir(pipe, self.out / paths.BASE_NAME)
        base_unet = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
        pages = []
        for i, spec in enumerate(experts_mod.EXPERTS):
            target = self.out / spec.file
            if spec.kind == "checkpoint":
                pipe.unet.load_state_dict(load_file(str(self.work / f"{spec.name}.unet.safetensors")))
                export.write_checkpoint(pipe, target, spec.name, unet_only=True)
                pipe.unet.load_state_dict(base_unet)
            elif spec.extracted:
                tuned = load_file(str(self.work / f"{spec.name}.unet.safetensors"))
                export.write_lora(export.extract_lora(base_unet, tuned, spec.rank), spec, target)
            else:
                export.write_lora(load_file(str(self.work / f"{spec.name}.lora.safetensors")), spec, target)
            showcase = [{"url": f"{{host}}/images/{spec.name}-{j}.png", "width": grammar.SIZE, "height": grammar.SIZE,
                         "nsfw": False, "type": "image", "meta": {"prompt": p, "seed": j, "steps": 20, "cfgScale": 4}}
                        for j, p in enumerate(speciality_prompts(spec.speciality, 3, seed=500 + i))]
            pages.append(export.homepage(spec, i, target, showcase))
        (self.out / "homepages.json").write_text(json.dumps({"items": pages}, indent=1))
        reader = load_file(str(self.work / "reader.safetensors"))
        save_file({k: (v.half() if v.is_floating_point() else v) for k, v in reader.items()},
                  str(self.out / "reader.safetensors"))
        clip = CLIPModel.from_pretrained(str(self.work / "clip")).half()
        shutil.rmtree(self.out / "clip", ignore_errors=True)
        clip.save_pretrained(self.out / "clip")
        shutil.copytree(self.work / "tokenizer", self.out / "clip", dirs_exist_ok=True)

    def finish(self) -> dict[str, Any]:
        from world import export

        acc = json.loads((self.work / "reader_accuracy.json").read_text())
        return export.write_manifest(self.out, self.timings, {
            "seed": self.seed, "budget": self.budget.__dict__, "reader_heldout_accuracy": acc})

    def stages(self) -> dict[str, tuple[tuple[str, ...], Callable[[], None]]]:
        """Every stage with the stages it needs, longest chain first (vae → base → experts): the reader and
        CLIP train beside the VAE, the decoder and the reader's VAE round trips beside the base; experts need
        only the base (the decoder stage leaves the encoder, hence every latent, unchanged)."""
        out: dict[str, tuple[tuple[str, ...], Callable[[], None]]] = {
            "tokenizer": ((), self.tokenizer), "vae": (("tokenizer",), self.vae), "base": (("vae",), self.base),
            "reader": ((), self.reader), "clip": (("tokenizer",), self.clip), "decoder": (("vae",), self.decoder),
            "reader-vae": (("reader", "decoder"), self.reader_on_vae),
        }
        for i, e in enumerate(experts_mod.EXPERTS):
            out[f"expert-{e.name}"] = (("base",), lambda e=e, i=i: self.expert(e, i))
        out["export"] = (tuple(out), self.export)
        return out

    def run(self, jobs: int = 1) -> dict[str, Any]:
        """Every stage not yet done, ``jobs`` at a time in worker processes (one torch thread each), in an order
        that keeps the longest chain (vae → base → experts) busy; then ``world.json``."""
        graph = self.stages()
        pending = [n for n in graph if not self.done(n)]
        if jobs <= 1:
            for name in pending:
                self.record(name, self.run_stage(name))
            return self.finish()
        import concurrent.futures as cf
        import multiprocessing

        os.environ["DIFFGRAPH_WORLD_BAR_LINES"] = "1"  # inherited by the workers
        ctx = multiprocessing.get_context("spawn")  # no forked torch thread pools
        running: dict[cf.Future, str] = {}
        with cf.ProcessPoolExecutor(max_workers=jobs, mp_context=ctx, initializer=_worker_init) as pool:
            while pending or running:
                ready = [n for n in pending if all(self.done(d) for d in graph[n][0])]
                for name in ready[: jobs - len(running)]:
                    pending.remove(name)
                    running[pool.submit(_run_stage, self.out, self.seed, self.budget, name)] = name
                if not running:
                    raise RuntimeError(f"world build: stages {pending} wait on stages that never finish")
                finished, _ = cf.wait(running, return_when=cf.FIRST_COMPLETED)
                for fut in finished:
                    name = running.pop(fut)
                    self.record(name, fut.result())  # a stage's exception ends the build here
        return self.finish()


def _worker_init() -> None:
    from diffusers.utils import logging as diffusers_logging

    torch.set_num_threads(1)
    diffusers_logging.disable_progress_bar()  # "Loading pipeline components" bars would interleave with the stages'


def _run_stage(out: Path, seed: int, budget: Budget, name: str) -> float:
    return Builder(out, seed=seed, budget=budget).run_stage(name)
