import numpy as np


def adherence(images, prompts):
    """Mean red channel in [0, 1] (a stand-in: deterministic in the image)."""
    return [float(np.asarray(im.convert("RGB"))[..., 0].mean() / 255.0) for im in images]


def clip_score(images, prompts):
    return [float(np.asarray(im.convert("RGB"))[..., 2].mean() / 255.0) + len(p) for im, p in zip(images, prompts, strict=True)]
