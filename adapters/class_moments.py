"""Class-conditional BN input statistics of the source model.

A batch's BN statistics mix the feature statistics of the classes it contains, so a
class-imbalanced or class-correlated batch of clean images has statistics far from the
source's although nothing about the inputs has shifted. How far depends on the layer:
early layers see colours and edges shared by all classes, the last layers see the
classes themselves. `ttaserve package` measures each layer's per-class moments on the
held-out calibration data (`calibration.safetensors`: `class_mean.{l}`, `class_var.{l}`),
and policies use them to tell those layers apart (`EmaStatistics.class_sensitivity_scale`).
"""

from __future__ import annotations

import torch


def class_conditional_moments(
    mean: torch.Tensor, var: torch.Tensor, labels: torch.Tensor, num_classes: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-class pooled moments (K, C) from per-sample moments (N, C) and labels (N,)."""
    onehot = torch.nn.functional.one_hot(labels, num_classes).to(mean.dtype)  # (N, K)
    counts = onehot.sum(0).clamp_min(1.0).unsqueeze(1)
    class_mean = onehot.T @ mean / counts
    second = onehot.T @ (var + mean.square()) / counts
    return class_mean, (second - class_mean.square()).clamp_min(0.0)


def class_sensitivity(
    class_moments: list[tuple[torch.Tensor, torch.Tensor]], source_vars: list[torch.Tensor]
) -> torch.Tensor:
    """Per layer (L,): the variance of the class means over channels, in units of the
    source variance, averaged over channels: how much a batch's class mix moves the layer."""
    spread = [
        ((class_mean - class_mean.mean(0)).square().mean(0) / var.clamp_min(1e-5)).mean()
        for (class_mean, _), var in zip(class_moments, source_vars, strict=True)
    ]
    return torch.stack(spread)
