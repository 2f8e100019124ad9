"""`source`: the frozen model, no adaptation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ttaserve.adapters.moments import Segments
from ttaserve.adapters.policy import GateResult, Observation, SourceModel, StateTensors
from ttaserve.adapters.stream_norm import StreamNorm


@dataclass(frozen=True)
class SourcePolicy:
    """Normalizes with the source statistics; the state holds nothing but counters."""

    name: str = "source"

    def params(self) -> dict[str, Any]:
        return {}

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
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return norm.running_mean.unsqueeze(0), norm.running_var.unsqueeze(0)

    def correct(
        self, logits: torch.Tensor, state: StateTensors, segments: Segments
    ) -> torch.Tensor:
        return logits

    def gate(self, logits: torch.Tensor, state: StateTensors, segments: Segments) -> GateResult:
        n = logits.shape[0]
        none = torch.zeros(n, dtype=torch.bool)
        return GateResult(accepted=none, open_set=none.clone(), open_set_score=torch.zeros(n))

    def update(
        self, state: StateTensors, observation: Observation, source: SourceModel
    ) -> StateTensors:
        return state
