"""Labelled image arrays in the `x`/`y` npz layout of `shared/data/cifar10` (uint8 HWC, int64)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip
DATA_ENV = "TTASERVE_CIFAR10_DIR"


@dataclass(frozen=True)
class LabelledImages:
    """Images as a uint8 tensor (N, H, W, C) with their int64 labels (N,)."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, index: torch.Tensor | np.ndarray) -> LabelledImages:
        index = torch.as_tensor(index)
        return LabelledImages(self.x[index], self.y[index])


def load_npz(path: str | Path) -> LabelledImages:
    """Load an `x`/`y` npz file without pickle."""
    with np.load(path, allow_pickle=False) as data:
        x, y = data["x"], data["y"]
    if x.ndim != 4 or x.dtype != np.uint8 or len(x) != len(y):
        raise ValueError(f"{path}: expected uint8 x of shape (N, H, W, C) and y of length N")
    return LabelledImages(torch.from_numpy(x), torch.from_numpy(y.astype(np.int64)))


def default_cifar10_dir() -> Path:
    """`$TTASERVE_CIFAR10_DIR`, else `../shared/data/cifar10` beside the repository."""
    if os.environ.get(DATA_ENV):
        return Path(os.environ[DATA_ENV])
    return Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10"


def stratified_split(
    labels: torch.Tensor, per_class: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split indices into (rest, held_out) with `per_class` held-out samples of each class."""
    gen = torch.Generator().manual_seed(seed)
    held: list[torch.Tensor] = []
    for c in labels.unique():
        idx = (labels == c).nonzero().flatten()
        held.append(idx[torch.randperm(len(idx), generator=gen)[:per_class]])
    held_out = torch.cat(held).sort().values
    mask = torch.ones(len(labels), dtype=torch.bool)
    mask[held_out] = False
    return mask.nonzero().flatten(), held_out


def stratified_subset(labels: torch.Tensor, per_class: int, seed: int) -> torch.Tensor:
    """Indices of `per_class` random samples of every class, in a random order."""
    _, held = stratified_split(labels, per_class, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    return held[torch.randperm(len(held), generator=gen)]
