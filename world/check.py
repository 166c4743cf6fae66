"""``diffgraph world check``: measure the shipped world against the quality targets of issue 13."""

from __future__ import annotations

from typing import Any

import torch

from world import grammar, paths, prompts, scorers
from world.experts import EXPERTS, ExpertSpec
from world.integrity import verified, verify_all

STEPS = 20
GUIDANCE = 4.0
TARGETS = {"reader": 0.95, "base": 0.70, "gain": 0.25}


def load_base() -> Any:
    from merger.diffusers_pipeline import load_pipeline

    base = verified(paths.base_model_path())
    return load_pipeline(base, base.with_suffix(""), "sd15", "cpu", "fp32")


def _sample(pipe: Any, ps: list[str], seeds: list[int]) -> list[Any]:
    from world.train import sample

    return sample(pipe, ps, seeds, steps=STEPS, guidance=GUIDANCE)


def expert_unet_state(spec: ExpertSpec, unet_config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """A checkpoint expert's UNet weights in diffusers names, read with the merger's (diffusers') converter."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
    from safetensors.torch import load_file

    ckpt = load_file(str(verified(paths.shipped_dir() / spec.file)))
    return {k: v.float() for k, v in convert_ldm_unet_checkpoint(ckpt, unet_config).items()}


def _apply(pipe: Any, base_state: dict[str, torch.Tensor], ckpts: list[tuple[ExpertSpec, float]],
           loras: list[tuple[ExpertSpec, float]]) -> None:
    """Task arithmetic θ = θ_base + Σ wᵢ(θᵢ − θ_base) for checkpoints, then weighted LoRAs fused."""
    state = {k: v.clone() for k, v in base_state.items()}
    for spec, w in ckpts:
        for k, v in expert_unet_state(spec, dict(pipe.unet.config)).items():
            state[k] += w * (v - base_state[k])
    pipe.unet.load_state_dict(state)
    if loras:
        names = []
        for spec, _ in loras:
            f = verified(paths.shipped_dir() / spec.file)
            pipe.load_lora_weights(str(f.parent), weight_name=f.name, adapter_name=spec.name.replace("-", "_"))
            names.append(spec.name.replace("-", "_"))
        pipe.set_adapters(names, [w for _, w in loras])
        pipe.fuse_lora(adapter_names=names)
        pipe.unload_lora_weights()


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else 0.0


def run(n_images: int = 16, quick: bool = False, log: Any = print) -> dict[str, Any]:
    """Every figure of the quality table; ``quick`` shrinks the samples (smoke tests)."""
    from world.train import make_data, reader_accuracy

    torch.set_num_threads(1)
    verify_all()
    result: dict[str, Any] = {"targets": TARGETS}
    held = make_data(64 if quick else 800, seed=424242)
    result["reader_accuracy"] = reader_accuracy(scorers._reader(), held)
    log(f"reader accuracy on held-out renders: {result['reader_accuracy']}")

    pipe = load_base()
    base_state = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    common = prompts.common_prompts(4 if quick else 40)
    seeds = list(range(len(common)))
    imgs = _sample(pipe, common, seeds)
    result["base_adherence_common"] = _mean(scorers.adherence(imgs, common))
    log(f"base adherence on well-represented prompts: {result['base_adherence_common']:.3f}")

    rows = []
    for spec in EXPERTS:
        ps = prompts.speciality_prompts(spec.speciality, 2 if quick else n_images)
        sd = list(range(100, 100 + len(ps)))
        _apply(pipe, base_state, [], [])
        before = scorers.adherence(_sample(pipe, ps, sd), ps)
        if spec.kind == "checkpoint":
            _apply(pipe, base_state, [(spec, 1.0)], [])
        else:
            _apply(pipe, base_state, [], [(spec, 1.0)])
        after_imgs = _sample(pipe, ps, sd)
        after = scorers.adherence(after_imgs, ps)
        row = {"name": spec.name, "kind": spec.kind, "layout": spec.layout,
               "speciality": {k: list(v) for k, v in spec.speciality.items()},
               "base": _mean(before), "expert": _mean(after), "gain": _mean(after) - _mean(before)}
        if "style" in spec.speciality:
            seen = scorers.read(after_imgs)
            row["style_recognised"] = _mean([s["style"] in spec.speciality["style"] for s in seen])
        rows.append(row)
        log(f"{spec.name:<18} base {row['base']:.2f} -> expert {row['expert']:.2f} (gain {row['gain']:+.2f})"
            + (f", style recognised {row['style_recognised']:.2f}" if "style_recognised" in row else ""))
    result["experts"] = rows

    comp = prompts.load_set("compositional-heldout")[: 4 if quick else 24]
    sd = list(range(300, 300 + len(comp)))
    right_scores, all_scores, base_scores = [], [], []
    _apply(pipe, base_state, [], [])
    base_scores = scorers.adherence(_sample(pipe, comp, sd), comp)
    ckpts = [e for e in EXPERTS if e.kind == "checkpoint"]
    loras = [e for e in EXPERTS if e.kind == "lora"]
    uniform = 1.0 / len(EXPERTS)
    _apply(pipe, base_state, [(e, uniform) for e in ckpts], [(e, uniform) for e in loras])
    all_scores = scorers.adherence(_sample(pipe, comp, sd), comp)
    for p, s in zip(comp, sd, strict=True):
        ck, lo = right_experts(p)
        _apply(pipe, base_state, [(e, 1.0) for e in ck], [(e, 1.0) for e in lo])
        right_scores += scorers.adherence(_sample(pipe, [p], [s]), [p])
    _apply(pipe, base_state, [], [])
    result["compositional"] = {"prompts": len(comp), "base": _mean(base_scores), "right_experts": _mean(right_scores),
                               "all_uniform": _mean(all_scores)}
    log(f"compositional: base {_mean(base_scores):.2f}, right experts {_mean(right_scores):.2f}, "
        f"all uniformly {_mean(all_scores):.2f}")
    return result


def right_experts(prompt: str) -> tuple[list[ExpertSpec], list[ExpertSpec]]:
    """For each rare value the prompt names, the checkpoint trained on it (else a LoRA trained on it)."""
    wanted = grammar.parse(prompt)
    ckpts: list[ExpertSpec] = []
    loras: list[ExpertSpec] = []
    for attr, value in wanted.items():
        if value not in grammar.RARE[attr]:
            continue
        match = [e for e in EXPERTS if value in e.speciality.get(attr, ())]
        ck = [e for e in match if e.kind == "checkpoint"]
        if ck:
            ckpts.append(ck[0])
        elif match:
            loras.append(match[0])
    return list({e.name: e for e in ckpts}.values()), list({e.name: e for e in loras}.values())


def table(result: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """(measure, value, target, ok) rows."""
    rows = []
    acc = result["reader_accuracy"]
    for a in grammar.ATTRIBUTES:
        rows.append((f"reader accuracy: {a}", f"{acc[a]:.3f}", "≥ 0.95", "✔" if acc[a] >= 0.95 else "✘"))
    b = result["base_adherence_common"]
    rows.append(("base adherence (well-represented prompts)", f"{b:.3f}", "≥ 0.70", "✔" if b >= 0.7 else "✘"))
    for e in result["experts"]:
        label = f"{e['kind']} {e['name']}: adherence on its speciality"
        rows.append((label, f"{e['base']:.2f} → {e['expert']:.2f} ({e['gain']:+.2f})", "+0.25",
                     "✔" if e["gain"] >= 0.25 else "✘"))
        if "style_recognised" in e and e["kind"] == "lora":
            rows.append((f"lora {e['name']}: style recognised", f"{e['style_recognised']:.2f}", "≥ 0.5",
                         "✔" if e["style_recognised"] >= 0.5 else "✘"))
    c = result["compositional"]
    rows.append(("compositional: right experts vs all uniformly",
                 f"{c['right_experts']:.2f} vs {c['all_uniform']:.2f} (base {c['base']:.2f})", "right > all",
                 "✔" if c["right_experts"] > c["all_uniform"] else "✘"))
    return rows


__all__ = ["run", "table", "markdown", "right_experts", "load_base"]


def markdown(result: dict[str, Any]) -> str:
    """The quality table as Markdown (what README shows)."""
    lines = ["| measure | value | target | |", "|---|---|---|---|"]
    lines += [f"| {m} | {v} | {t} | {ok} |" for m, v, t, ok in table(result)]
    return "\n".join(lines)
