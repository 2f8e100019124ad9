"""Unknown-class images for the open-set scenario, and its detection score.

The pool is scikit-learn's bundled handwritten digits (1,797 grey 8x8 images, shipped
with the package, nothing downloaded): upscaled to the model's input size and turned
into RGB, then corrupted like the known images of the same stream.
"""

from __future__ import annotations

import numpy as np
from PIL import Image


def digits_images(
    size: tuple[int, int] = (32, 32), limit: int | None = None, seed: int = 0
) -> np.ndarray:
    """uint8 (N, height, width, 3) digit images, in a seeded random order, at most `limit`."""
    from sklearn.datasets import load_digits

    grey = load_digits().images  # (1797, 8, 8) floats in [0, 16]
    order = np.random.default_rng(seed).permutation(len(grey))[:limit]
    small = np.clip(grey[order] * (255.0 / 16.0), 0, 255).round().astype(np.uint8)
    height, width = size
    big = [np.asarray(Image.fromarray(im).resize((width, height), Image.Resampling.BICUBIC)) for im in small]  # fmt: skip
    return np.repeat(np.stack(big)[..., None], 3, axis=3)


def open_set_auroc(unknown: np.ndarray, score: np.ndarray) -> float:
    """AUROC of `score` (higher = unknown) at telling unknown from known samples.

    0.5 when the policy gives no score (all equal) or only one kind of sample is present.
    """
    from sklearn.metrics import roc_auc_score

    unknown = np.asarray(unknown, dtype=bool)
    big = np.finfo(np.float64).max
    score = np.nan_to_num(np.asarray(score, dtype=np.float64), nan=0.0, posinf=big, neginf=-big)
    if unknown.all() or not unknown.any() or np.ptp(score) == 0:
        return 0.5
    return float(roc_auc_score(unknown, score))
