"""``diffgraph merge`` end to end on the tiny zoo."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import typer
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from core.types import ExpertKind, MergePlan, PlannedExpert
from merger.cli import register
from tests.fakes.zoo import TinyZoo, build_tiny_zoo


@pytest.fixture(scope="session")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> TinyZoo:
    return build_tiny_zoo(tmp_path_factory.getbasetemp() / "merger-tiny-zoo")


@pytest.fixture
def cli(settings):
    app = typer.Typer()
    register(app)
    app.command("noop")(lambda: None)  # a second command keeps "merge" a named subcommand
    runner = CliRunner()
    return lambda *args: runner.invoke(app, ["merge", *map(str, args)])


def _kohya_delta(path: Path, module: str) -> torch.Tensor:
    sd = load_file(path)
    stem = "lora_unet_" + module.replace(".", "_")
    up, down, alpha = sd[f"{stem}.lora_up.weight"], sd[f"{stem}.lora_down.weight"], sd[f"{stem}.alpha"].item()
    return (up @ down) * (alpha / down.shape[0])


def test_single_file_merge_with_lora(zoo: TinyZoo, cli, tmp_path: Path) -> None:
    from diffusers import StableDiffusionPipeline

    out = tmp_path / "merged.safetensors"
    result = cli("--base", zoo.base_file, "--ckpt", f"{zoo.checkpoints[0]}:0.5", "--ckpt", f"{zoo.checkpoints[1]}:0.25",
                 "--lora", f"{zoo.loras_kohya[0]}:0.8", "--dtype", "fp32", "--out", out, "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["layout"] == "single_file" and summary["loras"][0]["format"] == "kohya"
    merged, base = load_file(out), load_file(zoo.base_file)
    e0, e1 = load_file(zoo.checkpoints[0]), load_file(zoo.checkpoints[1])
    ta = lambda k: base[k] + 0.5 * (e0[k] - base[k]) + 0.25 * (e1[k] - base[k])  # noqa: E731
    untouched = "model.diffusion_model.out.2.weight"
    assert torch.equal(merged[untouched], ta(untouched))
    q = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"
    expected = ta(q) + 0.8 * _kohya_delta(zoo.loras_kohya[0], "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q")
    assert torch.allclose(merged[q], expected, atol=1e-6) and not torch.allclose(merged[q], ta(q), atol=1e-4)
    # the output is a standard single file: diffusers loads every component back
    pipe = StableDiffusionPipeline.from_single_file(str(out), config=str(zoo.base_dir), safety_checker=None,
                                                    requires_safety_checker=False)
    assert torch.equal(pipe.unet.state_dict()["conv_out.weight"], merged[untouched])


def test_diffusers_dir_merge_with_lora(zoo: TinyZoo, cli, tmp_path: Path) -> None:
    from diffusers import StableDiffusionPipeline

    out = tmp_path / "merged-dir"
    result = cli("--base", zoo.base_dir, "--ckpt", f"{zoo.checkpoints[2]}:0.4", "--lora",
                 f"{zoo.loras_diffusers[1]}:1.0", "--method", "dare", "--density", "0.7", "--seed", "3", "--out", out)
    assert result.exit_code == 0, result.output
    assert "dare" in result.output and "merged" in result.output
    pipe = StableDiffusionPipeline.from_pretrained(out)
    ref = StableDiffusionPipeline.from_pretrained(zoo.base_dir)
    for component in ("unet", "text_encoder", "vae"):
        got, want = getattr(pipe, component).state_dict(), getattr(ref, component).state_dict()
        assert set(got) == set(want)
    stored = load_file(out / "unet" / "diffusion_pytorch_model.safetensors")
    assert {t.dtype for t in stored.values()} == {torch.float16}
    te_q = "encoder.layers.0.self_attn.q_proj.weight"
    assert not torch.allclose(pipe.text_encoder.state_dict()[te_q].float(), ref.text_encoder.state_dict()[te_q], atol=1e-3)
    recipe = json.loads(_metadata(out / "unet" / "diffusion_pytorch_model.safetensors"))
    assert recipe["method"] == "dare" and recipe["seed"] == 3 and recipe["loras"][0]["weight"] == 1.0


def _metadata(path: Path) -> str:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as fh:
        return fh.metadata()["diffgraph_recipe"]


def test_plan_file_equals_flags(zoo: TinyZoo, cli, tmp_path: Path) -> None:
    plan = MergePlan(
        prompt="a fox", base_model=str(zoo.base_file), merge_method="ties", density=0.3,
        checkpoints=[PlannedExpert(expert_id="local:a", kind=ExpertKind.checkpoint, coefficient=0.6,
                                   path=str(zoo.checkpoints[0]))],
        loras=[PlannedExpert(expert_id="local:l", kind=ExpertKind.lora, coefficient=0.5,
                             path=str(zoo.loras_diffusers[0]))],
    )
    plan_file = tmp_path / "plan.json"
    plan_file.write_text(plan.model_dump_json())
    assert cli("--plan", plan_file, "--out", tmp_path / "a.safetensors").exit_code == 0
    flags = cli("--base", zoo.base_file, "--ckpt", f"{zoo.checkpoints[0]}:0.6", "--lora",
                f"{zoo.loras_diffusers[0]}:0.5", "--method", "ties", "--density", "0.3", "--out", tmp_path / "b.safetensors")
    assert flags.exit_code == 0, flags.output
    a, b = load_file(tmp_path / "a.safetensors"), load_file(tmp_path / "b.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    plan.checkpoints[0].path = None
    plan_file.write_text(plan.model_dump_json())
    result = cli("--plan", plan_file, "--out", tmp_path / "c.safetensors")
    assert result.exit_code == 1 and "local:a" in result.output and "no local path" in result.output


def _one_line_error(result, *fragments: str) -> None:
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_clear_errors(zoo: TinyZoo, cli, tmp_path: Path) -> None:
    out = tmp_path / "o.safetensors"
    _one_line_error(cli("--base", zoo.base_file, "--ckpt", f"{zoo.checkpoints[0]}:half", "--out", out),
                    "bad --ckpt", "FILE:WEIGHT")
    _one_line_error(cli("--base", zoo.base_file, "--ckpt", f"{tmp_path / 'absent.safetensors'}:0.5", "--out", out),
                    "checkpoint not found", "absent.safetensors")
    _one_line_error(cli("--base", tmp_path / "nobase.safetensors", "--ckpt", f"{zoo.checkpoints[0]}:1", "--out", out),
                    "base model not found")
    _one_line_error(cli("--base", zoo.base_file, "--out", out), "nothing to merge")
    _one_line_error(cli("--base", zoo.base_file, "--ckpt", f"{zoo.checkpoints[0]}:1", "--method", "soup", "--out", out),
                    "unknown --method")
    sdxl = load_file(zoo.checkpoints[0])
    sdxl["conditioner.embedders.1.model.positional_embedding"] = torch.zeros(77, 8)
    save_file(sdxl, str(tmp_path / "xl.safetensors"))
    _one_line_error(cli("--base", zoo.base_file, "--ckpt", f"{tmp_path / 'xl.safetensors'}:1", "--out", out),
                    "xl.safetensors is a sdxl model", "is sd15")
    torch.save(load_file(zoo.checkpoints[1]), tmp_path / "old.ckpt")
    _one_line_error(cli("--base", zoo.base_file, "--ckpt", f"{tmp_path / 'old.ckpt'}:1", "--out", out),
                    "old.ckpt", "pickle")
    truncated = tmp_path / "cut.safetensors"
    truncated.write_bytes(zoo.checkpoints[1].read_bytes()[:-100])
    _one_line_error(cli("--base", zoo.base_file, "--ckpt", f"{truncated}:1", "--out", out), "cut.safetensors", "truncated")
    bad_lora = load_file(zoo.loras_kohya[0])
    stem = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    bad_lora[f"{stem}.lora_down.weight"] = torch.zeros(2, 5)
    save_file(bad_lora, str(tmp_path / "wrong.safetensors"))
    _one_line_error(cli("--base", zoo.base_file, "--lora", f"{tmp_path / 'wrong.safetensors'}:1", "--out", out),
                    "wrong.safetensors", "does not fit", "attn1.to_q")
    assert not out.exists()


def test_merge_method_flag_recipe_metadata_and_deprecated_method(zoo: TinyZoo, cli, tmp_path: Path) -> None:
    from merger.merge import read_merge_recipe
    from merger.recipe import MergeRecipe

    new = cli("--base", zoo.base_file, "--ckpt", f"{zoo.checkpoints[0]}:0.6", "--merge-method", "ties",
              "--density", "0.3", "--dtype", "fp32", "--json", "--out", tmp_path / "new.safetensors")
    assert new.exit_code == 0, new.output
    assert "deprecated" not in new.stderr
    summary = json.loads(new.stdout)
    assert summary["merge_method"] == summary["method"] == "ties"  # the old --json key is still written
    recipe = read_merge_recipe(tmp_path / "new.safetensors")
    assert recipe == MergeRecipe(str(zoo.base_file), ((str(zoo.checkpoints[0]), 0.6),), "ties", 0.3, 0, "fp32")
    assert summary["recipe_digest"] == recipe.digest()
    old = cli("--base", zoo.base_file, "--ckpt", f"{zoo.checkpoints[0]}:0.6", "--method", "ties",
              "--density", "0.3", "--dtype", "fp32", "--out", tmp_path / "old.safetensors")
    assert old.exit_code == 0, old.output
    assert "--method is now --merge-method" in old.stderr
    a, b = load_file(tmp_path / "new.safetensors"), load_file(tmp_path / "old.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
