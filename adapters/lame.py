"""LAME (Boudiaf et al., CVPR 2022): Laplacian-adjusted maximum-likelihood estimation.

Output-level and parameter-free: within one request, predictions are smoothed over a
k-nearest-neighbour graph of the L2-normalized penultimate features,
Y <- softmax(log p + W Y), until the energy stops changing. It helps class-correlated
batches and hurts i.i.d. ones, so `only_if_correlated` applies it only to requests of at
least `min_batch` images whose mean prediction has low entropy (few classes present).
Works for models without batch norm too (it needs only features and logits).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ttaserve.adapters.policy import (
    BatchObservation,
    BatchView,
    Observation,
    SourceModel,
    StateTensors,
)
from ttaserve.adapters.reliability_gate import entropy


def knn_affinity(features: torch.Tensor, k: int) -> torch.Tensor:
    """Binary kNN affinity (n, n) on L2-normalized features, without self-loops."""
    f = torch.nn.functional.normalize(features, dim=1)
    sim = f @ f.T
    sim.fill_diagonal_(-math.inf)
    k = min(k, f.shape[0] - 1)
    idx = sim.topk(k, dim=1).indices
    return torch.zeros_like(sim).scatter_(1, idx, 1.0)


def lame(probs: torch.Tensor, features: torch.Tensor, k: int = 5, max_steps: int = 100) -> torch.Tensor:  # fmt: skip
    """LAME's bound optimization: the smoothed assignment Y (n, K)."""
    affinity = knn_affinity(features, k)
    unary = -probs.clamp_min(1e-12).log()
    y = probs
    previous = math.inf
    for _ in range(max_steps):
        y = (-unary + affinity @ y).softmax(1)
        energy = float((y * (unary + y.clamp_min(1e-12).log())).sum() - 0.5 * (y * (affinity @ y)).sum())  # fmt: skip
        if abs(energy - previous) <= 1e-8 * abs(previous):
            break
        previous = energy
    return y


@dataclass(frozen=True)
class LameCorrection:
    """Apply LAME per request (optionally only to detectably class-correlated requests)."""

    knn: int = 5
    min_batch: int = 16
    only_if_correlated: bool = True
    diversity_ratio: float = 0.5  # correlated: H(mean p) < ratio * H(source prior)

    def init_state(self, source: SourceModel) -> StateTensors:
        return {}

    def correlated(self, probs: torch.Tensor, source_prior: torch.Tensor) -> bool:
        marginal = probs.mean(0, keepdim=True)
        return bool(entropy(marginal)[0] < self.diversity_ratio * entropy(source_prior.unsqueeze(0))[0])  # fmt: skip

    def correct(self, view: BatchView, logits: torch.Tensor) -> torch.Tensor:
        if view.features is None or not bool((view.segments.sizes >= self.min_batch).any()):
            return logits  # no request large enough to smooth
        out = logits.clone()
        probs = logits.softmax(1)
        bounds = torch.cumsum(view.segments.sizes.long(), 0)
        start = 0
        for end in bounds.tolist():
            rows = slice(start, end)
            start = end
            if end - rows.start < self.min_batch:
                continue
            if self.only_if_correlated and not self.correlated(probs[rows], view.source.prior):
                continue
            out[rows] = lame(probs[rows], view.features[rows], self.knn).clamp_min(1e-12).log()
        return out

    def update(self, state: StateTensors, obs: Observation, source: SourceModel) -> StateTensors:
        return state

    def update_batch(self, state: StateTensors, obs: BatchObservation, source: SourceModel) -> StateTensors:  # fmt: skip
        return state
