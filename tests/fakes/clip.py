"""Tiny, randomly initialised scorer weights for tests and CPU benchmarks (offline, deterministic).

``build_tiny_clip(root)`` writes a small ``CLIPModel`` (text + vision towers) with its ``CLIPProcessor`` and a
random LAION-architecture aesthetic head, and returns the ``scorer_paths`` mapping for ``Settings``.
The scores these produce are meaningless as quality judgements; they exercise the real code paths.
"""

from __future__ import annotations

from pathlib import Path

PROJECTION_DIM = 32
IMAGE_SIZE = 32
_COMPLETE = ".complete"


def write_aesthetic_head(path: Path, input_dim: int, seed: int = 0) -> Path:
    """Save a randomly initialised LAION improved-aesthetic-predictor MLP (``layers.N.*`` keys) as safetensors."""
    import torch
    from safetensors.torch import save_file

    from calibration.scorers import AestheticMLP

    torch.manual_seed(seed)
    head = AestheticMLP(input_dim)
    save_file({k: v.contiguous() for k, v in head.state_dict().items()}, str(path),
              metadata={"format": "pt", "note": "random weights for tests"})
    return path


def build_tiny_clip(root: Path, seed: int = 0) -> dict[str, str]:
    """Write (or reuse) a tiny CLIP scorer under ``root``; returns ``{"clip": dir, "aesthetic": file}``."""
    root = Path(root)
    clip_dir = root / "tiny-clip"
    head = root / "tiny-aesthetic.safetensors"
    paths = {"clip": str(clip_dir), "aesthetic": str(head)}
    if (root / _COMPLETE).is_file():
        return paths

    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    from tests.fakes.zoo import write_tiny_tokenizer

    # The zoo's real (tiny) BPE vocabulary keeps reference prompts within CLIP's 77 tokens.
    write_tiny_tokenizer(clip_dir)
    # transformers 5.x: CLIPTokenizer(vocab_file=...) silently ignores the files; from_pretrained reads them.
    tokenizer = CLIPTokenizer.from_pretrained(str(clip_dir))
    vocab_size = len(tokenizer)
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    )
    config = CLIPConfig(
        text_config={
            "vocab_size": vocab_size, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 2, "max_position_embeddings": 77,
            "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        vision_config={
            "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
            "image_size": IMAGE_SIZE, "patch_size": 8,
        },
        projection_dim=PROJECTION_DIM,
    )
    torch.manual_seed(seed)
    model = CLIPModel(config).eval()
    model.save_pretrained(str(clip_dir))
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(str(clip_dir))
    write_aesthetic_head(head, PROJECTION_DIM, seed=seed)
    (root / _COMPLETE).write_text("ok\n")
    return paths
