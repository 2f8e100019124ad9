"""Per-sample channel moments and their reduction over request segments."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Segments:
    """Which request (segment) each sample of a batch belongs to.

    `index[i]` is the request of sample i (requests are numbered 0..count-1) and
    `sizes[r]` the number of samples of request r.
    """

    index: torch.Tensor  # (N,) int64
    sizes: torch.Tensor  # (R,) float32

    @classmethod
    def from_sizes(cls, sizes: list[int]) -> Segments:
        """Segments of consecutive samples: request r holds `sizes[r]` samples."""
        counts = torch.tensor(sizes, dtype=torch.int64)
        index = torch.repeat_interleave(torch.arange(len(sizes)), counts)
        return cls(index=index, sizes=counts.to(torch.float32))

    @property
    def count(self) -> int:
        return len(self.sizes)


def sample_moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample, per-channel mean and (biased) variance over the spatial dims of (N, C, ...)."""
    dims = tuple(range(2, x.ndim))
    var, mean = torch.var_mean(x, dim=dims, correction=0)
    return mean, var


def segment_sum(values: torch.Tensor, segments: Segments) -> torch.Tensor:
    """Sum of per-sample rows (N, C) within each segment -> (R, C)."""
    out = values.new_zeros((segments.count, *values.shape[1:]))
    return out.index_add_(0, segments.index, values)


def segment_moments(
    mean: torch.Tensor, var: torch.Tensor, segments: Segments
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and variance of each segment's pooled samples from per-sample moments.

    Law of total variance: the segment variance is the mean within-sample variance plus
    the variance of the sample means. Empty segments get zeros.
    """
    n = segments.sizes.clamp(min=1).unsqueeze(1)
    seg_mean = segment_sum(mean, segments) / n
    spread = (mean - seg_mean[segments.index]).square()
    seg_var = segment_sum(var + spread, segments) / n
    return seg_mean, seg_var


def pooled_moments(
    mean: torch.Tensor, var: torch.Tensor, weights: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and variance of all samples' pooled values from per-sample moments (N, C),
    optionally with per-sample weights (N,)."""
    if weights is None:
        pooled_mean = mean.mean(0)
        return pooled_mean, (var + (mean - pooled_mean).square()).mean(0)
    w = (weights / weights.sum().clamp_min(1e-12)).unsqueeze(1)
    pooled_mean = (w * mean).sum(0)
    return pooled_mean, (w * (var + (mean - pooled_mean).square())).sum(0)


def mix_moments(
    mean_a: torch.Tensor,
    var_a: torch.Tensor,
    mean_b: torch.Tensor,
    var_b: torch.Tensor,
    weight_b: torch.Tensor | float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Moments of the mixture (1-w)·A + w·B of two distributions.

    With w = 0 the result is exactly (mean_a, var_a), bit for bit.
    """
    w = weight_b
    mean = (1 - w) * mean_a + w * mean_b
    var = (1 - w) * var_a + w * var_b + w * (1 - w) * (mean_a - mean_b).square()
    return mean, var
