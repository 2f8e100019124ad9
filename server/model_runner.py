"""Runs one forward pass of the shared model for a batch of requests of many streams.

Each request is a segment of the batch; its stream's state tensors are stacked per
request so that the policy can gather per-sample normalization statistics.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ttaserve.adapters.moments import Segments
from ttaserve.adapters.policy import AdaptationPolicy, GateResult, SourceModel, StateTensors
from ttaserve.adapters.stream_norm import NormContext, StreamNorm, active_context
from ttaserve.server.model_package import LoadedModel


@dataclass(frozen=True)
class ForwardResult:
    """Outputs of one forward pass over a batch of segments."""

    logits: torch.Tensor  # (N, K) after the policy's output correction
    probs: torch.Tensor  # (N, K)
    gate: GateResult
    moments: list[tuple[torch.Tensor, torch.Tensor]]  # per layer: (N, C) means, variances


def stack_states(states: Sequence[StateTensors]) -> StateTensors:
    """Stack per-request state dicts into one dict of (R, ...) tensors."""
    if not states or not states[0]:
        return {}
    return {key: torch.stack([s[key] for s in states]) for key in states[0]}


class ModelRunner:
    """The shared model with stream norms; stateless between calls."""

    def __init__(self, model: LoadedModel) -> None:
        self.model = model
        card = model.card
        self.source = SourceModel(
            layers=model.layers,
            prior=torch.tensor(card.source_prior, dtype=torch.float32),
            num_classes=len(card.class_names),
        )

    @property
    def layers(self) -> list[StreamNorm]:
        return self.model.layers

    @torch.inference_mode()
    def forward(
        self,
        x: torch.Tensor,
        segments: Segments,
        policy: AdaptationPolicy,
        states: Sequence[StateTensors],
    ) -> ForwardResult:
        """Normalize each segment with its stream's state under `policy`; no state changes."""
        batched = stack_states(states)

        def statistics(layer: int, mean: torch.Tensor, var: torch.Tensor, norm: StreamNorm):
            return policy.layer_statistics(layer, batched, mean, var, segments, norm)

        ctx = NormContext(statistics=statistics)
        with active_context(ctx):
            raw = self.model.module(x)
        logits = policy.correct(raw, batched, segments)
        gate = policy.gate(logits, batched, segments)
        moments = [ctx.moments[i] for i in range(len(self.layers))]
        return ForwardResult(logits=logits, probs=logits.softmax(1), gate=gate, moments=moments)
