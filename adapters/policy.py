"""The contract every adaptation policy fulfils, on tensors only.

A policy turns a stream's state (a flat dict of named tensors) and a batch's per-sample
moments into normalization statistics, corrects and gates the outputs, and computes the
stream's next state as a pure function of (old state, observation). That purity is what
lets a store re-apply an update after a compare-and-set conflict without a second forward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch

from ttaserve.adapters.moments import Segments
from ttaserve.adapters.stream_norm import StreamNorm

StateTensors = dict[str, torch.Tensor]


@dataclass(frozen=True)
class SourceModel:
    """What policies know of the frozen source model."""

    layers: list[StreamNorm]  # stream-norm layers, in layer-index order
    prior: torch.Tensor  # (K,) source label distribution
    num_classes: int

    def layer_statistics(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.layers[layer].running_mean, self.layers[layer].running_var


@dataclass(frozen=True)
class Observation:
    """What one stream's requests in a batch contribute to its next state."""

    moments: list[tuple[torch.Tensor, torch.Tensor]]  # per layer: (n, C) means and variances
    probs: torch.Tensor  # (n, K) adapted class probabilities of the same samples
    samples_seen: int  # samples the stream had seen before this observation

    @property
    def count(self) -> int:
        return int(self.probs.shape[0])


@dataclass(frozen=True)
class GateResult:
    """Per-sample decisions: may the sample update the state, and is it open-set."""

    accepted: torch.Tensor  # (N,) bool
    open_set: torch.Tensor  # (N,) bool
    open_set_score: torch.Tensor  # (N,) float, higher = more likely unknown


class AdaptationPolicy(Protocol):
    """A named, parameterized adaptation policy. Implementations are small and pure."""

    name: str

    def params(self) -> dict[str, Any]:
        """The policy's parameters, recorded in each stream's state header."""

    def init_state(self, source: SourceModel) -> StateTensors:
        """A fresh stream's state: the source model's behaviour."""

    def layer_statistics(
        self,
        layer: int,
        state: StateTensors,
        mean: torch.Tensor,
        var: torch.Tensor,
        segments: Segments,
        norm: StreamNorm,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(mu, var) to normalize each sample with; `state` tensors are stacked per request."""

    def correct(
        self, logits: torch.Tensor, state: StateTensors, segments: Segments
    ) -> torch.Tensor:
        """Output-level correction (e.g. label prior); identity for most policies."""

    def gate(self, logits: torch.Tensor, state: StateTensors, segments: Segments) -> GateResult:
        """Which samples may update their stream's state."""

    def update(
        self, state: StateTensors, observation: Observation, source: SourceModel
    ) -> StateTensors:
        """The stream's next state from its accepted samples (pure)."""


def accept_all(logits: torch.Tensor) -> GateResult:
    """A gate that accepts every sample and flags none as open-set."""
    n = logits.shape[0]
    return GateResult(
        accepted=torch.ones(n, dtype=torch.bool),
        open_set=torch.zeros(n, dtype=torch.bool),
        open_set_score=torch.zeros(n),
    )
