"""Scorer registry: real tiny CLIP scores, unavailable scorers reported with reasons, never faked."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from calibration.scorers import Unavailable, available_scorers, scorer_version
from core.settings import Settings
from tests.fakes.clip import write_aesthetic_head


def _images(n: int) -> list[Image.Image]:
    return [Image.fromarray((np.random.RandomState(i).rand(48, 48, 3) * 255).astype("uint8")) for i in range(n)]


def test_tiny_clip_and_aesthetic_score_images(tmp_path: Path, tiny_clip: dict[str, str]) -> None:
    scorers = available_scorers(Settings(data_dir=tmp_path, scorer_paths=tiny_clip, device="cpu"))
    clip, aesthetic = scorers["clip"], scorers["aesthetic"]
    assert not isinstance(clip, Unavailable) and not isinstance(aesthetic, Unavailable)
    imgs = _images(3)
    a = clip.score(imgs, ["a red fox", "a red fox", "a blue car"])
    assert len(a) == 3 and all(math.isfinite(x) for x in a)
    assert a[0] != a[1]  # different images, same prompt
    # Batch-independent up to the float noise of different batch-shape kernels (not bit-equal on CPU),
    # a tolerance still far below the gap between two images.
    assert clip.score(imgs[:1], ["a red fox"]) == pytest.approx(a[:1], rel=1e-4)
    assert a[1] != pytest.approx(a[0], rel=1e-4)
    s = aesthetic.score(imgs, ["", "", ""])
    assert len(s) == 3 and all(math.isfinite(x) for x in s) and s[0] != s[1]
    version = scorer_version(scorers)
    assert version.startswith("aesthetic:") and "+clip:" in version


def test_missing_weights_are_reported_unavailable(tmp_path: Path, tiny_clip: dict[str, str]) -> None:
    paths = {**tiny_clip, "pickscore": str(tmp_path / "nope"), "hpsv2": str(tmp_path)}
    scorers = available_scorers(Settings(data_dir=tmp_path, scorer_paths=paths, device="cpu"))
    assert set(scorers) == {"clip", "aesthetic", "imagereward", "hpsv2", "pickscore", "world-adherence", "world-clip"}
    assert all(isinstance(scorers[w], Unavailable) for w in ("world-adherence", "world-clip"))  # not configured
    pick, hps, reward = scorers["pickscore"], scorers["hpsv2"], scorers["imagereward"]
    assert isinstance(pick, Unavailable) and "not found" in pick.reason and "nope" in pick.reason
    assert isinstance(hps, Unavailable) and "config.json" in hps.reason
    assert isinstance(reward, Unavailable) and "no weights configured" in reward.reason
    assert "pickscore" not in scorer_version(scorers)

    present = {**tiny_clip, "imagereward": tiny_clip["aesthetic"]}  # a file exists but no tokenizer beside it
    reward = available_scorers(Settings(data_dir=tmp_path, scorer_paths=present, device="cpu"))["imagereward"]
    assert isinstance(reward, Unavailable) and "bert-base-uncased tokenizer" in reward.reason
    pickled = tmp_path / "ImageReward.pt"
    pickled.write_bytes(b"not read")
    reward = available_scorers(Settings(data_dir=tmp_path, scorer_paths={"imagereward": str(pickled)}))["imagereward"]
    assert isinstance(reward, Unavailable) and "DIFFGRAPH_ALLOW_PICKLE" in reward.reason

    nothing = available_scorers(Settings(data_dir=tmp_path, device="cpu"))
    assert all(isinstance(v, Unavailable) for v in nothing.values())
    assert scorer_version(nothing) == ""


def test_clip_family_scorer_loads_from_a_clip_directory(tmp_path: Path, tiny_clip: dict[str, str]) -> None:
    paths = {"pickscore": tiny_clip["clip"]}
    pick = available_scorers(Settings(data_dir=tmp_path, scorer_paths=paths, device="cpu"))["pickscore"]
    assert not isinstance(pick, Unavailable)
    assert pick.version.startswith("pickscore:")
    assert all(math.isfinite(x) for x in pick.score(_images(2), ["a cat", "a dog"]))


def test_bad_aesthetic_heads_are_unavailable_with_reason(tmp_path: Path, tiny_clip: dict[str, str]) -> None:
    wrong_dim = write_aesthetic_head(tmp_path / "head768.safetensors", 768)
    scorers = available_scorers(Settings(data_dir=tmp_path, device="cpu",
                                         scorer_paths={**tiny_clip, "aesthetic": str(wrong_dim)}))
    assert isinstance(scorers["aesthetic"], Unavailable)
    assert "768" in scorers["aesthetic"].reason
    assert not isinstance(scorers["clip"], Unavailable)

    truncated = tmp_path / "trunc.safetensors"
    truncated.write_bytes(Path(tiny_clip["aesthetic"]).read_bytes()[:100])
    s2 = available_scorers(Settings(data_dir=tmp_path, device="cpu",
                                    scorer_paths={**tiny_clip, "aesthetic": str(truncated)}))
    assert isinstance(s2["aesthetic"], Unavailable) and "cannot read" in s2["aesthetic"].reason

    pth = tmp_path / "head.pth"
    pth.write_bytes(b"\x80\x04not really")
    s3 = available_scorers(Settings(data_dir=tmp_path, device="cpu", scorer_paths={**tiny_clip, "aesthetic": str(pth)}))
    assert isinstance(s3["aesthetic"], Unavailable) and ".safetensors" in s3["aesthetic"].reason
