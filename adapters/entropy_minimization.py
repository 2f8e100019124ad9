"""Gradient adaptation of per-stream BN affine parameters by entropy minimization.

TENT (Wang et al., ICLR 2021) and its filtered variants, per stream: the stream's state
holds its own BN weight and bias for every layer (and SGD momentum), the shared model
never changes. One forward with gradients w.r.t. the stacked per-stream parameters, a
loss per request, and the update is an SGD-with-momentum step applied in `update` from
the recorded gradient (so a compare-and-set retry re-applies the same step).

Sample filters and weights:
- `none`: TENT: mean entropy of all samples;
- `eta`: EATA without its Fisher term (ETA): samples with H < margin * ln K, weighted
  by exp(margin * ln K - H);
- `sar`: SAR's reliable-entropy filter H < margin * ln K (without SAM's second step);
- `roid`: ROID-style certainty weights exp(-H / T) with T = 1/3 over the known samples.
After each step the parameters are pulled back towards the source
(theta <- (1 - pull) * theta + pull * theta_source, ROID's weight ensembling).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ttaserve.adapters.moments import segment_sum
from ttaserve.adapters.policy import (
    BatchView,
    GateResult,
    Observation,
    SourceModel,
    StateTensors,
)
from ttaserve.adapters.reliability_gate import entropy


def affine_keys(layer: int) -> tuple[str, str]:
    return f"affine.{layer}.weight", f"affine.{layer}.bias"


def momentum_key(key: str) -> str:
    return "affine_momentum." + key.removeprefix("affine.")


@dataclass(frozen=True)
class EntropyMinimization:
    """Per-stream SGD on BN affine parameters (the `tent` family)."""

    lr: float = 0.005  # per batch of 64; scaled by n / 64 for smaller requests
    momentum: float = 0.9
    pull_to_source: float = 0.01
    sample_filter: str = "eta"  # none, eta, sar, roid
    margin: float = 0.4

    differentiable: tuple[str, ...] = ("affine.",)  # state-key prefixes that get gradients

    def init_state(self, source: SourceModel) -> StateTensors:
        state: StateTensors = {}
        for layer, norm in enumerate(source.layers):
            w_key, b_key = affine_keys(layer)
            state[w_key], state[b_key] = norm.weight.clone(), norm.bias.clone()
            state[momentum_key(w_key)] = torch.zeros_like(norm.weight)
            state[momentum_key(b_key)] = torch.zeros_like(norm.bias)
        return state

    def affine(
        self, layer: int, state: StateTensors, segments
    ) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[no-untyped-def]
        w_key, b_key = affine_keys(layer)
        return segments.per_sample(state[w_key]), segments.per_sample(state[b_key])

    def _weights(self, h: torch.Tensor, gate: GateResult, k: int) -> torch.Tensor:
        e0 = self.margin * math.log(k)
        known = (~gate.open_set).float()
        if self.sample_filter == "none":
            return known
        if self.sample_filter == "sar":
            return known * (h < e0).float()
        if self.sample_filter == "roid":
            return known * torch.exp(-h.detach() * 3.0)
        return known * (h < e0).float() * torch.exp(e0 - h.detach())

    def loss(self, view: BatchView, logits: torch.Tensor, gate: GateResult) -> torch.Tensor:
        h = entropy(view.logits.softmax(1))
        w = self._weights(h, gate, view.logits.shape[1])
        per_request = segment_sum((w * h).unsqueeze(1), view.segments).squeeze(1)
        return (per_request / view.segments.sizes.clamp_min(1)).sum()

    def update(self, state: StateTensors, obs: Observation, source: SourceModel) -> StateTensors:
        if not obs.grads:
            return state
        scale = min(1.0, obs.requested / 64)
        new = dict(state)
        for layer, norm in enumerate(source.layers):
            for key, origin in zip(affine_keys(layer), (norm.weight, norm.bias), strict=True):
                grad = obs.grads.get(key)
                if grad is None or not torch.isfinite(grad).all():
                    continue
                velocity = self.momentum * state[momentum_key(key)] + grad
                value = state[key] - self.lr * scale * velocity
                new[key] = (1 - self.pull_to_source) * value + self.pull_to_source * origin
                new[momentum_key(key)] = velocity
        return new
