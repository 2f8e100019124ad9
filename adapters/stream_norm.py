"""Stream normalization: batch norm whose statistics are chosen per sample by a policy.

Every BatchNorm layer of a model is replaced by a `StreamNorm` that normalizes sample i
with statistics (mu_i, var_i) supplied by the active `NormContext`:

    y_i = x_i * a_i + b_i,   a_i = gamma / sqrt(var_i + eps),   b_i = beta - a_i * mu_i

so requests of different streams share one forward pass without sharing statistics.
Without an active context the layer is the frozen source batch norm.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from ttaserve.adapters.moments import sample_moments

# (layer index, per-sample means (N, C), per-sample variances (N, C), layer) ->
# (mu, var[, weight, bias]), each (N, C) or (1, C).
LayerStatistics = Callable[[int, torch.Tensor, torch.Tensor, "StreamNorm"], tuple[torch.Tensor, ...]]  # fmt: skip


@dataclass
class NormContext:
    """What one forward pass normalizes with, and what it saw: moments and features.

    `statistics=None` runs the frozen source model (no per-sample moments are computed)
    while still tapping the classifier features."""

    statistics: LayerStatistics | None
    moments: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    features: torch.Tensor | None = None  # input of the classifier head, when tapped


_ONES = (1, 1, 1)  # trailing singleton dims that broadcast (N, C) over (N, C, ...)
_ACTIVE: contextvars.ContextVar[NormContext | None] = contextvars.ContextVar(
    "ttaserve_norm_context", default=None
)


@contextlib.contextmanager
def active_context(ctx: NormContext) -> Iterator[NormContext]:
    """Make `ctx` the normalization context of forward passes in this thread/task."""
    token = _ACTIVE.set(ctx)
    try:
        yield ctx
    finally:
        _ACTIVE.reset(token)


def source_statistics(_layer: int, _mean: torch.Tensor, _var: torch.Tensor, norm: StreamNorm) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """`LayerStatistics` of the frozen source model: a context that records the moments a
    forward pass sees while normalizing exactly as without a context."""
    return norm.running_mean.unsqueeze(0), norm.running_var.unsqueeze(0)


class StreamNorm(nn.Module):
    """A batch-norm layer whose statistics come per sample from the active context."""

    def __init__(
        self,
        layer_index: int,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        running_mean: torch.Tensor,
        running_var: torch.Tensor,
        eps: float,
    ) -> None:
        super().__init__()
        channels = running_mean.numel()
        self.layer_index = layer_index
        self.eps = float(eps)
        ones, zeros = torch.ones(channels), torch.zeros(channels)
        self.register_buffer(
            "weight", (ones if weight is None else weight.detach()).float().clone()
        )
        self.register_buffer("bias", (zeros if bias is None else bias.detach()).float().clone())
        self.register_buffer("running_mean", running_mean.detach().float().clone())
        self.register_buffer("running_var", running_var.detach().float().clone())

    @property
    def channels(self) -> int:
        return self.running_mean.numel()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ctx = _ACTIVE.get()
        if ctx is None or ctx.statistics is None:  # the frozen source layer, its native kernel
            return self.frozen(x)
        out, mean, variance = self.adapt(x, ctx.statistics)
        ctx.moments[self.layer_index] = (mean, variance)
        return out

    def frozen(self, x: torch.Tensor) -> torch.Tensor:
        """The source batch norm."""
        return _batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, self.eps)  # fmt: skip

    def adapt(self, x: torch.Tensor, statistics: LayerStatistics) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
        """x normalized per sample with what `statistics` gives for its per-sample moments;
        returns (output, means (N, C), variances (N, C))."""
        mean, variance = sample_moments(x if x.dtype == torch.float32 else x.float())
        stats = statistics(self.layer_index, mean, variance, self)
        mu, var = stats[0], stats[1]
        weight, bias = self.weight, self.bias
        if len(stats) > 2 and stats[2] is not None:
            weight, bias = stats[2], stats[3]
        # Eager: one native kernel where the layout allows; compiled: plain arithmetic, which
        # the compiler fuses with its neighbours.
        if x.dtype == torch.float32 and not _needs_grad(x, mu, var, weight, bias) and not torch.compiler.is_compiling():  # fmt: skip
            out = _per_sample_batch_norm(x, mu, var, weight, bias, self.eps)
            if out is not None:
                return out, mean, variance
        scale = weight * (var + self.eps).rsqrt()
        shift = torch.addcmul(bias, scale, mu, value=-1.0)  # bias - scale * mu
        if x.dtype != scale.dtype:
            scale, shift = scale.to(x.dtype), shift.to(x.dtype)
        view = (*scale.shape, *_ONES[: x.ndim - 2])
        return torch.addcmul(shift.view(view), x, scale.view(view)), mean, variance

    @classmethod
    def from_batchnorm(cls, layer_index: int, bn: nn.modules.batchnorm._BatchNorm) -> StreamNorm:
        if bn.running_mean is None or bn.running_var is None:
            raise ValueError("batch norm without running statistics cannot be a stream norm")
        return cls(layer_index, bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.eps)


def _batch_norm(x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:  # fmt: skip
    """Inference batch norm with per-channel (C,) statistics and affine."""
    return torch.batch_norm(x, weight, bias, mean, var, False, 0.0, eps, False)


def _needs_grad(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _per_sample_batch_norm(x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor | None:  # fmt: skip
    """x_i * a_i + b_i with per-sample (N, C) or shared (1, C) statistics and (C,) or (N, C)
    affine, through the native inference batch-norm kernel: shared statistics normalize x
    as it is (any memory format); per-sample ones treat a contiguous x as one sample of
    N*C channels (a free view). One kernel instead of four operations, and ~2x faster
    than a broadcast `addcmul` on a 32-image batch. None where neither applies (per-sample
    statistics of a channels-last x); no gradients flow into the statistics here."""
    if mean.shape[0] == 1 and var.shape[0] == 1 and weight.dim() == 1 and bias.dim() == 1:
        return _batch_norm(x, mean[0], var[0], weight, bias, eps)
    if not x.is_contiguous():
        return None
    rows = (x.shape[0], x.shape[1])
    flat = x.view(1, rows[0] * rows[1], *x.shape[2:])
    out = _batch_norm(
        flat,
        mean.expand(rows).reshape(-1),
        var.expand(rows).reshape(-1),
        weight.expand(rows).reshape(-1),
        bias.expand(rows).reshape(-1),
        eps,
    )
    return out.view_as(x)


class FeatureTap(nn.Module):
    """Identity that hands its input (the classifier head's features) to the active context."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():  # a compiled forward returns the features itself
            return x
        ctx = _ACTIVE.get()
        if ctx is not None:
            ctx.features = x.flatten(1)
        return x


def tap_classifier_features(model: nn.Module) -> bool:
    """Record the input of the model's last Linear layer as features; False if it has none."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        return False
    tap = FeatureTap()
    linears[-1].register_forward_pre_hook(lambda _module, args: (tap(args[0]),))
    return True


def convert_batchnorm_modules(model: nn.Module) -> list[StreamNorm]:
    """Replace every BatchNorm2d/3d of `model` in place by a StreamNorm; returns them in order.

    BatchNorm1d layers keep their source statistics (instance statistics of a vector are
    meaningless), as in UnMix-TNS.
    """
    layers: list[StreamNorm] = []

    def visit(parent: nn.Module) -> None:
        for name, child in parent.named_children():
            if isinstance(child, nn.BatchNorm2d | nn.BatchNorm3d):
                layer = StreamNorm.from_batchnorm(len(layers), child)
                layers.append(layer)
                setattr(parent, name, layer)
            else:
                visit(child)

    visit(model)
    return layers


def stream_norm_layers(model: nn.Module) -> list[StreamNorm]:
    """The StreamNorm layers of a converted model, ordered by layer index."""
    layers = [m for m in model.modules() if isinstance(m, StreamNorm)]
    return sorted(layers, key=lambda m: m.layer_index)
