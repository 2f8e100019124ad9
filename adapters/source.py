"""Source statistics: the frozen model's own BN statistics, no state."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ttaserve.adapters.moments import Segments
from ttaserve.adapters.policy import (
    BatchObservation,
    Normalization,
    Observation,
    SourceModel,
    StateTensors,
)
from ttaserve.adapters.stream_norm import StreamNorm


@dataclass(frozen=True)
class SourceStatistics:
    """Normalize with the source running statistics; nothing to update."""

    per_sample = False  # the frozen model: the runner skips the per-sample moments

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
        return Normalization(norm.running_mean.unsqueeze(0), norm.running_var.unsqueeze(0))

    def update(self, state: StateTensors, obs: Observation, source: SourceModel) -> StateTensors:
        return state

    def update_batch(self, state: StateTensors, obs: BatchObservation, source: SourceModel) -> StateTensors:  # fmt: skip
        return state
