"""Real-file quirks a new user meets: a CLIP ``position_ids`` buffer missing from an SD1.5 expert, a raw
``PeftModel.save_pretrained`` LoRA (``base_model.model.`` keys, alpha in ``adapter_config.json``)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from merger.lora import fuse_loras, load_lora
from merger.merge import merge_checkpoints
from merger.merge_writer import write_safetensors
from tests.fakes.zoo import TinyZoo, build_tiny_zoo

POS_IDS = "cond_stage_model.transformer.text_model.embeddings.position_ids"


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> TinyZoo:
    return build_tiny_zoo(tmp_path_factory.getbasetemp() / "merger-tiny-zoo")


def test_expert_without_position_ids_buffer_merges(zoo: TinyZoo, tmp_path: Path) -> None:
    base = load_file(zoo.base_file)
    base[POS_IDS] = torch.arange(77, dtype=torch.int64)[None]
    write_safetensors(tmp_path / "base.safetensors", base)
    expert = load_file(zoo.checkpoints[0])
    expert.pop(POS_IDS, None)
    write_safetensors(tmp_path / "expert.safetensors", expert)
    out = merge_checkpoints(tmp_path / "base.safetensors", [(tmp_path / "expert.safetensors", 0.5)],
                            "task_arithmetic", tmp_path / "m.safetensors", dtype="fp32")
    merged = load_file(out)
    assert torch.equal(merged[POS_IDS], base[POS_IDS])
    key = "model.diffusion_model.out.2.weight"
    assert torch.allclose(merged[key], base[key] + 0.5 * (expert[key] - base[key]), atol=1e-6)


def test_learned_tensor_missing_is_still_refused(zoo: TinyZoo, tmp_path: Path) -> None:
    from merger.errors import IncompatibleExpert

    expert = load_file(zoo.checkpoints[0])
    expert.pop("cond_stage_model.transformer.text_model.final_layer_norm.weight")
    write_safetensors(tmp_path / "expert.safetensors", expert)
    with pytest.raises(IncompatibleExpert, match="final_layer_norm"):
        merge_checkpoints(zoo.base_file, [(tmp_path / "expert.safetensors", 0.5)], "task_arithmetic",
                          tmp_path / "m.safetensors")


@pytest.mark.parametrize("component", ["unet", "text_encoder"])
def test_raw_peft_save_matches_merge_and_unload(zoo: TinyZoo, tmp_path: Path, component: str) -> None:
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig, get_peft_model

    pipe = StableDiffusionPipeline.from_pretrained(str(zoo.base_dir), local_files_only=True, safety_checker=None)
    model = getattr(pipe, component)
    targets = ["to_q", "to_v"] if component == "unet" else ["q_proj", "v_proj"]
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=2.0, target_modules=targets,
                                                  init_lora_weights=False))
    peft_model.save_pretrained(str(tmp_path / "adapter"))
    weights = tmp_path / "adapter" / "adapter_model.safetensors"
    assert all(k.startswith("base_model.model.") for k in load_file(weights))
    deltas = load_lora(weights)
    assert deltas.components == {component}
    ours = StableDiffusionPipeline.from_pretrained(str(zoo.base_dir), local_files_only=True, safety_checker=None)
    fuse_loras(torch.nn.ModuleDict({component: getattr(ours, component)}), [(deltas, 1.0)])
    theirs = peft_model.merge_and_unload().state_dict()
    mine = getattr(ours, component).state_dict()
    for key, value in theirs.items():  # alpha/r = 0.5 comes only from adapter_config.json
        assert torch.allclose(mine[key], value, atol=1e-5), key
    assert len(deltas.deltas) == sum(1 for k in theirs if k.endswith(tuple(f"{t}.weight" for t in targets)))
