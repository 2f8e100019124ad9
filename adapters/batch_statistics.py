"""Stateless batch statistics: BN-adapt (Schneider et al. 2020; Nado et al. 2020) and
alpha-BN (You et al. 2021): mu = (1 - alpha) * mu_source + alpha * mu_request.

Each request is a segment: its samples are normalized with the pooled statistics of that
request only (a single image uses its instance statistics).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ttaserve.adapters.moments import Segments, segment_moments
from ttaserve.adapters.policy import (
    BatchObservation,
    Normalization,
    Observation,
    SourceModel,
    StateTensors,
    source_mixed_normalization,
)
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
        return source_mixed_normalization(norm, req_mean, req_var, self.alpha, segments)

    def update(self, state: StateTensors, obs: Observation, source: SourceModel) -> StateTensors:
        return state

    def update_batch(self, state: StateTensors, obs: BatchObservation, source: SourceModel) -> StateTensors:  # fmt: skip
        return state
