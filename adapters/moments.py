"""Per-sample channel moments and their reduction over request segments."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property

import torch


@dataclass(frozen=True)
class Segments:
    """Which request (segment) each sample of a batch belongs to.

    `index[i]` is the request of sample i (requests are numbered 0..count-1) and
    `sizes[r]` the number of samples of request r. What the forward pass reads of it
    (`membership`, `divisors`; `singletons` in eager) is computed once at construction,
    so that a compiled forward sees plain tensors (`torch.compile` cannot trace
    `functools.cached_property` or a data-dependent `bool`).
    """

    index: torch.Tensor  # (N,) int64
    sizes: torch.Tensor  # (R,) float32
    # True when every segment holds exactly one sample, in order (index is 0..N-1)
    singletons: bool = field(init=False)
    membership: torch.Tensor = field(init=False, repr=False)  # (R, N): 1 where i is in r
    divisors: torch.Tensor = field(init=False, repr=False)  # (R, 1) sizes, at least 1

    def __post_init__(self) -> None:
        n, count = len(self.index), len(self.sizes)
        singletons = n == count and bool((self.index == torch.arange(n)).all())
        membership = torch.zeros(count, n)
        membership[self.index, torch.arange(n)] = 1.0
        object.__setattr__(self, "singletons", singletons)
        object.__setattr__(self, "membership", membership)
        object.__setattr__(self, "divisors", self.sizes.clamp(min=1).unsqueeze(1))

    @classmethod
    def from_sizes(cls, sizes: list[int]) -> Segments:
        """Segments of consecutive samples: request r holds `sizes[r]` samples."""
        counts = torch.tensor(sizes, dtype=torch.int64)
        index = torch.repeat_interleave(torch.arange(len(sizes)), counts)
        return cls(index=index, sizes=counts.to(torch.float32))

    @property
    def count(self) -> int:
        return len(self.sizes)

    @property
    def identity(self) -> bool:
        """Whether per-request rows are per-sample rows as they are (`singletons`), for the
        eager fast paths. A compiled forward takes the general paths, which compute the
        same values bit for bit here, so that it needs no variant of its own for batches
        of one-image requests."""
        return not torch.compiler.is_compiling() and self.singletons

    @cached_property
    def offsets(self) -> list[int]:
        """Where each segment starts, and the end: segment r is rows offsets[r]:offsets[r + 1]
        (segments of consecutive samples, as `from_sizes` makes them). Read by the state
        updates, never by the forward: computed when first asked for."""
        return [0, *torch.cumsum(self.sizes, 0).long().tolist()]

    def per_sample(self, rows: torch.Tensor) -> torch.Tensor:
        """Per-request rows (R, ...) gathered per sample (N, ...); the rows themselves when
        every request is one sample, in order (the gather would be the identity)."""
        return rows if self.identity else rows[self.index]

    def broadcast(self, rows: torch.Tensor) -> torch.Tensor:
        """Per-request rows (R, ...) for per-sample arithmetic: gathered per sample (N, ...),
        or the one request's (1, ...) row itself, which broadcasts over its samples."""
        return rows if len(self.sizes) == 1 else self.per_sample(rows)

    def mean(self, values: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        """Per-segment (weighted) mean of per-sample rows (N, ...) -> (R, ...); a segment
        whose weights sum to 0 gets zeros."""
        if weights is None:
            return segment_sum(values, self) / self.divisors.view(-1, *[1] * (values.dim() - 1))
        total = segment_sum(weights.unsqueeze(1), self).clamp_min(1e-12)
        summed = segment_sum(values * weights.view(-1, *[1] * (values.dim() - 1)), self)
        return summed / total.view(-1, *[1] * (values.dim() - 1))


_CHUNK_ELEMENTS = 1 << 22  # deviations are formed at most this many elements at a time (16 MiB)


def sample_moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample, per-channel mean and (biased) variance over the spatial dims of (N, C, ...).

    Two passes (mean, then mean squared deviation): as stable as `torch.var_mean` and, on
    CPU, several times faster for the small per-sample reductions of a stream norm. The
    deviations are squared in place (one temporary instead of two: 1.4-1.7x faster on a
    128-image batch, same values), and those of a very large batch are formed a few
    samples at a time (same values), keeping temporaries below the mmap threshold that
    `server/allocator.py` sets (page faults on every fresh mmap made large temporaries
    ~10x slower than the convolutions). The spatial dims are reduced where they lie, so a
    channels-last activation (what decoded images give) is not copied first.
    """
    dims = tuple(range(2, x.dim()))  # reduced in place: a channels-last x is not copied
    mean = x.mean(dims, keepdim=True)
    if torch.compiler.is_compiling():  # the compiler fuses the deviations: no temporaries
        return mean.flatten(1), (x - mean).square().mean(dims)
    spatial = math.prod(x.shape[2:])
    step = max(1, _CHUNK_ELEMENTS // max(1, x.shape[1] * spatial))
    if step >= x.shape[0]:
        return mean.flatten(1), _mean_square(x - mean, dims)
    var = torch.cat([_mean_square(x[i : i + step] - mean[i : i + step], dims) for i in range(0, x.shape[0], step)])  # fmt: skip
    return mean.flatten(1), var


def _mean_square(deviations: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """Mean over `dims` of the squared deviations (squared in place unless autograd needs
    them)."""
    squared = deviations.square() if deviations.requires_grad else deviations.square_()
    return squared.mean(dims)


def segment_sum(values: torch.Tensor, segments: Segments) -> torch.Tensor:
    """Sum of per-sample rows (N, C) within each segment -> (R, C).

    A product with the (R, N) membership matrix: `index_add_` took ~16% of the server's
    forward thread for one 32-image request (py-spy), a matmul a few microseconds."""
    membership = segments.membership
    if membership.dtype != values.dtype or membership.device != values.device:
        membership = membership.to(values)
    summed = membership @ values.reshape(values.shape[0], -1)
    return summed.reshape(segments.count, *values.shape[1:])


def segment_moments(
    mean: torch.Tensor, var: torch.Tensor, segments: Segments
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and variance of each segment's pooled samples from per-sample moments.

    Law of total variance: the segment variance is the mean within-sample variance plus
    the variance of the sample means. Empty segments get zeros. One-sample segments are
    returned as they are (the same values the general path computes).
    """
    if segments.identity:
        return mean, var
    if len(segments.sizes) == 1:  # one request: plain reductions over the samples
        seg_mean = mean.mean(0, keepdim=True)
        return seg_mean, (var + (mean - seg_mean).square()).mean(0, keepdim=True)
    n = segments.divisors
    seg_mean = segment_sum(mean, segments) / n
    spread = (mean - seg_mean[segments.index]).square()
    seg_var = segment_sum(var + spread, segments) / n
    return seg_mean, seg_var


def weighted_segment_moments(
    mean: torch.Tensor, var: torch.Tensor, segments: Segments, weights: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """`segment_moments` with per-sample weights (N,): each segment's pooled (R, C) mean
    and variance; a segment whose weights sum to 0 gets zeros."""
    seg_mean = segments.mean(mean, weights)
    spread = (mean - segments.per_sample(seg_mean)).square()
    return seg_mean, segments.mean(var + spread, weights)


def pooled_moments(
    mean: torch.Tensor, var: torch.Tensor, weights: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and variance of all samples' pooled values from per-sample moments (N, C),
    optionally with per-sample weights (N,)."""
    if weights is None and mean.shape[0] == 1:
        return mean[0], var[0]  # what the general path computes for one sample, bit for bit
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

    With w = 0 the result is exactly (mean_a, var_a) and with w = 1 exactly (mean_b,
    var_b), bit for bit (`torch.lerp` is exact at both ends); a Python weight of 0 or 1
    skips the arithmetic (same values, broadcast to the shape the arithmetic would give).
    Seven tensor operations: this runs twice per layer per forward pass, where each
    operation's dispatch costs more than its arithmetic.
    """
    w = weight_b
    if isinstance(w, float | int):
        if w in (0, 1):
            mean, var = (mean_a, var_a) if w == 0 else (mean_b, var_b)
            shape = _broadcast_shape(mean_a.shape, mean_b.shape)
            if mean.shape != shape:
                mean, var = mean.expand(shape), var.expand(shape)
            return mean, var
        spread = (mean_a - mean_b).square()
        var = torch.lerp(var_a, var_b, w).add_(spread, alpha=w * (1 - w))
        return torch.lerp(mean_a, mean_b, w), var
    spread = (mean_a - mean_b).square()
    var = torch.addcmul(torch.lerp(var_a, var_b, w), w * (1 - w), spread)
    return torch.lerp(mean_a, mean_b, w), var


def _broadcast_shape(a: torch.Size, b: torch.Size) -> torch.Size:
    """`torch.broadcast_shapes` for the common cases, without its overhead."""
    if a == b:
        return a
    rank = max(len(a), len(b))  # align trailing dims, as broadcasting does: (C,) with (1, C)
    a, b = (1,) * (rank - len(a)) + tuple(a), (1,) * (rank - len(b)) + tuple(b)
    if all(x == y or x == 1 or y == 1 for x, y in zip(a, b, strict=True)):
        return torch.Size(y if x == 1 else x for x, y in zip(a, b, strict=True))
    return torch.broadcast_shapes(a, b)  # raises the usual error
