"""ImageReward and HPSv2 on transformers classes equal independent forwards of the original architectures,
on tiny random weights saved in the released checkpoint key formats (pickled ``.pt`` as released)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from calibration.reward_models import ConversionError, read_state_dict
from calibration.scorers import LOADERS, Unavailable
from core.settings import Settings
from tests.evaluation import reference_models as ref

PROMPTS = ["a red fox in the snow", "portrait of an old sailor, oil painting"]
WORDS = "a red fox in the snow portrait of an old sailor oil painting , photo cat".split()


def _images() -> list[Image.Image]:
    g = torch.Generator().manual_seed(5)
    return [Image.fromarray((torch.rand(40, 48, 3, generator=g) * 255).byte().numpy()) for _ in range(2)]


def test_hpsv2_matches_open_clip(tmp_path: Path, tiny_clip: dict[str, str]) -> None:
    from transformers import CLIPTokenizer

    vocab = len(CLIPTokenizer.from_pretrained(tiny_clip["clip"]))
    state, config = ref.tiny_open_clip(vocab)
    ckpt = tmp_path / "hps" / "HPS_v2_compressed.pt"
    ckpt.parent.mkdir()
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, ckpt)  # as HPSv2's training saves
    (ckpt.parent / "open_clip_config.json").write_text(json.dumps(config))

    refused = LOADERS["hpsv2"](Settings(data_dir=tmp_path, scorer_paths={"hpsv2": str(ckpt), **tiny_clip}))
    assert isinstance(refused, Unavailable) and "DIFFGRAPH_ALLOW_PICKLE" in refused.reason
    settings = Settings(data_dir=tmp_path, scorer_paths={"hpsv2": str(ckpt), **tiny_clip}, allow_pickle=True,
                        device="cpu")
    scorer = LOADERS["hpsv2"](settings)
    assert not isinstance(scorer, Unavailable)

    images = _images()
    pixels = scorer.processor(images=images, return_tensors="pt")["pixel_values"]
    ids = scorer.processor.tokenizer(PROMPTS, padding="max_length", max_length=77, return_tensors="pt")["input_ids"]
    img, txt = scorer.embeddings(pixels, ids)
    with torch.no_grad():
        want_img = torch.nn.functional.normalize(ref.open_clip_image(state, pixels, heads=2), dim=-1)
        want_txt = torch.nn.functional.normalize(ref.open_clip_text(state, ids, heads=2), dim=-1)
    torch.testing.assert_close(img, want_img, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(txt, want_txt, atol=1e-5, rtol=1e-4)
    scores = scorer.score(images, PROMPTS)
    assert scores == pytest.approx((want_img * want_txt).sum(-1).tolist(), abs=1e-5)


def _bert_tokenizer(path: Path) -> Path:
    path.mkdir(parents=True)
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *dict.fromkeys(WORDS)]
    (path / "vocab.txt").write_text("\n".join(tokens) + "\n")
    return path


def test_imagereward_matches_blip(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    tok_dir = _bert_tokenizer(tmp_path / "ir" / "tokenizer")
    vocab = len((tok_dir / "vocab.txt").read_text().split()) + 2  # BLIP adds [DEC] and [ENC]
    state, med = ref.tiny_image_reward(vocab)
    ckpt = tmp_path / "ir" / "ImageReward.pt"
    torch.save(state, ckpt)
    (ckpt.parent / "med_config.json").write_text(json.dumps(med))
    scorer = LOADERS["imagereward"](Settings(data_dir=tmp_path, scorer_paths={"imagereward": str(ckpt)},
                                             allow_pickle=True, device="cpu"))
    assert not isinstance(scorer, Unavailable), scorer

    images = _images()
    pixels = scorer.processor(images=images, return_tensors="pt")["pixel_values"]
    tok = scorer.tokenizer(PROMPTS, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    assert tok["input_ids"][0, 0] == scorer.tokenizer.cls_token_id and int(tok["attention_mask"][0].sum()) < 35
    with torch.no_grad():
        want = ref.image_reward(state, pixels, tok["input_ids"], tok["attention_mask"], v_heads=2, t_heads=2)
    got = scorer.reward(pixels, tok["input_ids"], tok["attention_mask"])
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert scorer.score(images, PROMPTS) == pytest.approx(want.tolist(), abs=1e-4)

    # the same weights as safetensors need no pickle switch
    safe = tmp_path / "ir" / "ImageReward.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(safe))
    again = LOADERS["imagereward"](Settings(data_dir=tmp_path, scorer_paths={
        "imagereward": str(safe), "imagereward_tokenizer": str(tok_dir)}, device="cpu"))
    assert again.score(images, PROMPTS) == pytest.approx(want.tolist(), abs=1e-4)


def test_bad_checkpoints_are_clear_errors(tmp_path: Path) -> None:
    junk = tmp_path / "junk.pt"
    torch.save({"a": torch.zeros(1)}, junk)
    tok = _bert_tokenizer(tmp_path / "tokenizer")
    with pytest.raises(ConversionError, match="not an ImageReward checkpoint"):
        LOADERS["imagereward"](Settings(data_dir=tmp_path, allow_pickle=True,
                                        scorer_paths={"imagereward": str(junk), "imagereward_tokenizer": str(tok)}))
    evil = tmp_path / "evil.pt"
    evil.write_bytes(b"\x80\x04\x95not a pickle of tensors")
    with pytest.raises(ConversionError, match="weights_only=True"):
        read_state_dict(evil, allow_pickle=True)
