"""`bn`: per-stream EMA batch-norm statistics mixed with each request's own statistics.

Sample i of request r is normalized with

    stream  = the stream's accumulated statistics (EMA, initialized at the source)
    target  = mix(stream, request_r, w_r),   w_r = n_r / (n_r + request_prior)
    used    = mix(source, target, alpha)

where `mix` takes the moments of the mixture distribution (so a single image's instance
statistics are a valid, if small, contribution: no variance of one sample is computed).
With alpha = 0 the layer reproduces the source model exactly. After the request, the
stream's statistics move towards the accepted samples' pooled statistics with momentum
max(n / (n_seen + n + source_prior), 1 - (1 - momentum_floor)^n): a cumulative average
at first, then an EMA that keeps tracking drift. This is alpha-BN (You et al., 2021) with
a per-stream memory in place of its stateless batch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

from ttaserve.adapters.moments import Segments, mix_moments, pooled_moments, segment_moments
from ttaserve.adapters.policy import (
    GateResult,
    Observation,
    SourceModel,
    StateTensors,
    accept_all,
)
from ttaserve.adapters.stream_norm import StreamNorm


def state_keys(layer: int) -> tuple[str, str]:
    """Names of a layer's stream mean and variance in the state record."""
    return f"bn.{layer}.mean", f"bn.{layer}.var"


def ema_momentum(n: int, samples_seen: int, source_prior: float, floor: float) -> float:
    """Momentum of a stream update with n samples after `samples_seen`: decays to a floor."""
    cumulative = n / (samples_seen + n + source_prior)
    return max(cumulative, 1.0 - (1.0 - floor) ** n)


@dataclass(frozen=True)
class EmaBatchNormPolicy:
    """alpha-BN-style mixing of source, stream and request statistics (policy `bn`)."""

    alpha: float = 1.0  # weight of the adapted statistics against the source's
    request_prior: float = 16.0  # pseudo-samples of stream statistics against a request's
    source_prior: float = 16.0  # pseudo-samples of source statistics in a fresh stream
    momentum_floor: float = 1e-3  # per-sample EMA momentum once the stream is long
    name: str = "bn"

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"bn: alpha must be in [0, 1], got {self.alpha}")
        if self.request_prior < 0 or self.source_prior < 0 or not 0 < self.momentum_floor <= 1:
            raise ValueError("bn: priors must be >= 0 and momentum_floor in (0, 1]")

    def params(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k != "name"}

    def init_state(self, source: SourceModel) -> StateTensors:
        state: StateTensors = {}
        for layer, norm in enumerate(source.layers):
            mean_key, var_key = state_keys(layer)
            state[mean_key] = norm.running_mean.clone()
            state[var_key] = norm.running_var.clone()
        return state

    def layer_statistics(
        self,
        layer: int,
        state: StateTensors,
        mean: torch.Tensor,
        var: torch.Tensor,
        segments: Segments,
        norm: StreamNorm,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        mean_key, var_key = state_keys(layer)
        req_mean, req_var = segment_moments(mean, var, segments)
        w = (segments.sizes / (segments.sizes + self.request_prior)).unsqueeze(1)
        tgt_mean, tgt_var = mix_moments(state[mean_key], state[var_key], req_mean, req_var, w)
        mu, sigma2 = mix_moments(
            norm.running_mean.unsqueeze(0), norm.running_var.unsqueeze(0), tgt_mean, tgt_var,
            self.alpha,
        )  # fmt: skip
        return mu[segments.index], sigma2[segments.index].clamp_min(0.0)

    def correct(
        self, logits: torch.Tensor, state: StateTensors, segments: Segments
    ) -> torch.Tensor:
        return logits

    def gate(self, logits: torch.Tensor, state: StateTensors, segments: Segments) -> GateResult:
        return accept_all(logits)

    def update(
        self, state: StateTensors, observation: Observation, source: SourceModel
    ) -> StateTensors:
        n = observation.count
        if n == 0:
            return state
        momentum = ema_momentum(n, observation.samples_seen, self.source_prior, self.momentum_floor)
        new_state = dict(state)
        for layer, (mean, var) in enumerate(observation.moments):
            mean_key, var_key = state_keys(layer)
            obs_mean, obs_var = pooled_moments(mean, var)
            new_mean, new_var = mix_moments(
                state[mean_key], state[var_key], obs_mean, obs_var, momentum
            )
            new_state[mean_key], new_state[var_key] = new_mean, new_var.clamp_min(0.0)
        return new_state
