"""Stateless batch statistics: BN-adapt (Schneider et al. 2020; Nado et al. 2020) and
alpha-BN (You et al. 2021): mu = (1 - alpha) * mu_source + alpha * mu_request.

Each request is a segment: its samples are normalized with the pooled statistics of that
request only (a single image uses its instance statistics).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ttaserve.adapters.moments import Segments, mix_moments, segment_moments
from ttaserve.adapters.policy import Normalization, Observation, SourceModel, StateTensors
from ttaserve.adapters.stream_norm import StreamNorm


@dataclass(frozen=True)
class BatchStatistics:
    """alpha = 1: BN-adapt (test-batch statistics); alpha = 0.1: alpha-BN's published default."""

    alpha: float = 1.0

    def init_state(self, source: SourceModel) -> StateTensors:
        return {}

    def layer_statistics(
        self,
        layer: int,
        state: StateTensors,
        mean: torch.Tensor,
        var: torch.Tensor,
        segments: Segments,
        norm: StreamNorm,
    ) -> Normalization:
        req_mean, req_var = segment_moments(mean, var, segments)
        mu, sigma2 = mix_moments(
            norm.running_mean.unsqueeze(0),
            norm.running_var.unsqueeze(0),
            req_mean,
            req_var,
            self.alpha,  # fmt: skip
        )
        return Normalization(mu[segments.index], sigma2[segments.index].clamp_min(0.0))

    def update(self, state: StateTensors, obs: Observation, source: SourceModel) -> StateTensors:
        return state
