"""Open-set score from feature statistics: how far a sample's features sit from its stream's.

Each stream-norm layer already measures every sample's per-channel feature means (the
per-sample moments of its input). A sample of an unknown class lands far from its stream's
BN statistics in the middle of the network, where features describe objects but are not
yet the class logits: the score is the log of the mean over channels, and over the layers
between `depth[0]` and `depth[1]` of the network's stream norms, of

    ((m_i - mu_stream) / sigma_stream)^2

with the stream's adapted statistics (the source's for a policy that keeps none). A
request of `request_min_batch` or more samples is standardized against its own samples
(median and MAD): a domain switch moves all of them and flags none, while the unknown
minority stands out. Smaller requests are standardized against the stream's running score
statistics, which learn from every sample (flagged ones too, so that a stream cannot lock
itself out of a new domain), and flag nothing before `warmup_samples`. Unlike the energy
score (`reliability_gate.EnergyOpenSetGate`) it does not depend on the logits, whose
energy a corruption lowers as much as an unknown class does.

Measured on the demo model (`default`, open-set streams of the accuracy benchmark, 300
CIFAR-10 images + 75 digits per domain; docs/findings/accuracy.md): AUROC 0.81 on clean
data and 0.71 on average over the 10 benchmark corruptions against the energy score's 0.76
and 0.56; 0.79 against 0.61 over the five held-out corruptions.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ttaserve.adapters.ema_batchnorm import state_keys
from ttaserve.adapters.moments import mix_moments, pooled_moments, segment_moments
from ttaserve.adapters.policy import (
    BatchObservation,
    BatchView,
    GateResult,
    Observation,
    SourceModel,
    StateTensors,
)

FEATURE_MEAN_KEY, FEATURE_VAR_KEY, FEATURE_SEEN_KEY = (
    "gate.feature_mean",
    "gate.feature_var",
    "gate.feature_seen",
)


def feature_layers(num_layers: int, depth: tuple[float, float]) -> range:
    """The stream-norm layers between the fractions `depth` of the network (at least one)."""
    first = min(round(depth[0] * num_layers), num_layers - 1)
    last = max(first + 1, min(round(depth[1] * num_layers), num_layers))
    return range(first, last)


def feature_distance(
    moments: list[tuple[torch.Tensor, torch.Tensor]],
    state: StateTensors,
    source: SourceModel,
    layers: range,
    per_sample: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """(N,) log of the mean over `layers` and channels of each sample's squared standardized
    distance from its stream's statistics (`per_sample` gathers the streams' (R, C) rows
    per sample, or broadcasts one stream's); the log brings its spread closer to normal."""
    total = None
    for layer in layers:
        mean, _ = moments[layer]
        mean_key, var_key = state_keys(layer)
        if mean_key in state:
            mu, var = per_sample(state[mean_key].reshape(-1, mean.shape[1])), per_sample(state[var_key].reshape(-1, mean.shape[1]))  # fmt: skip
        else:  # a policy without stream statistics normalizes with the source's
            mu, var = source.layer_statistics(layer)
        d = (mean - mu).square_().div_(var.clamp_min(1e-5)).mean(1)
        total = d if total is None else total + d
    assert total is not None
    return (total / len(layers)).clamp_min(1e-6).log_()


def _robust_z(score: torch.Tensor) -> torch.Tensor:
    """Scores standardized by their median and MAD (a fifth of outliers barely moves them)."""
    median = score.median()
    mad = (score - median).abs().median().mul(1.4826).clamp_min(1e-3)
    return (score - median) / mad


@dataclass(frozen=True)
class FeatureOpenSetGate:
    """Flag samples whose mid-network features sit far from their stream's statistics."""

    depth: tuple[float, float] = (0.55, 0.7)  # of the stream-norm layers: 12-14 of 21
    z_threshold: float = 2.0
    rate: float = 0.01  # per-sample EMA rate of the stream's score statistics, once warm
    warmup_samples: int = 64
    # a request of at least this many samples is scored against its own samples (median
    # and MAD), so that a domain switch, which moves all of them, flags none
    request_min_batch: int = 16

    def __post_init__(self) -> None:
        if not 0.0 <= self.depth[0] < self.depth[1] <= 1.0:
            raise ValueError(f"depth must be (lo, hi) with 0 <= lo < hi <= 1, got {self.depth}")

    def init_state(self, source: SourceModel) -> StateTensors:
        return {FEATURE_MEAN_KEY: torch.zeros(1), FEATURE_VAR_KEY: torch.ones(1), FEATURE_SEEN_KEY: torch.zeros(1)}  # fmt: skip

    def _scores(self, moments: list[tuple[torch.Tensor, torch.Tensor]], state: StateTensors, source: SourceModel, per_sample: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:  # fmt: skip
        return feature_distance(moments, state, source, feature_layers(len(moments), self.depth), per_sample)  # fmt: skip

    def gate(self, view: BatchView, logits: torch.Tensor) -> GateResult:
        n = logits.shape[0]
        if not view.moments:  # the frozen model measured no moments: nothing to score
            return GateResult.accept_all(n)
        seg = view.segments
        score = self._scores(view.moments, view.state, view.source, seg.broadcast)
        mean = seg.broadcast(view.state[FEATURE_MEAN_KEY].flatten())
        std = seg.broadcast(view.state[FEATURE_VAR_KEY].flatten()).clamp_min(1e-6).sqrt()
        warm = seg.broadcast(view.state[FEATURE_SEEN_KEY].flatten()) >= self.warmup_samples
        z = torch.where(warm, (score - mean) / std, torch.zeros_like(score))
        for start, end in zip(seg.offsets[:-1], seg.offsets[1:], strict=False):
            if end - start >= self.request_min_batch:  # against the request's own samples
                z[start:end] = _robust_z(score[start:end])
        open_set = z > self.z_threshold
        return GateResult(~open_set, open_set, z)

    def _moved(self, state: StateTensors, n: torch.Tensor, batch_mean: torch.Tensor, spread: torch.Tensor) -> StateTensors:  # fmt: skip
        """The score statistics moved towards a request's (n samples, their mean and spread):
        a running average while the stream is young, then an EMA at `rate` per sample."""
        mean, var, seen = state[FEATURE_MEAN_KEY], state[FEATURE_VAR_KEY], state[FEATURE_SEEN_KEY]  # fmt: skip
        step = torch.maximum(n / (seen + n).clamp_min(1.0), 1 - (1 - self.rate) ** n)
        new_mean, new_var = mix_moments(mean, var, batch_mean, spread, step)
        updated = n > 0
        return {
            FEATURE_MEAN_KEY: torch.where(updated, new_mean, mean),
            FEATURE_VAR_KEY: torch.where(updated, new_var.clamp_min(1e-6), var),
            FEATURE_SEEN_KEY: seen + n,
        }

    def update_batch(self, state: StateTensors, obs: BatchObservation, source: SourceModel) -> StateTensors:  # fmt: skip
        """`update` for every request of a forward pass at once (row r from request r)."""
        if not obs.moments:
            return state
        seg = obs.segments
        score = self._scores(obs.moments, state, source, seg.broadcast).unsqueeze(1)
        batch_mean, spread = segment_moments(score, torch.zeros_like(score), seg)
        n = seg.sizes.to(torch.float32).unsqueeze(1)
        return dict(state) | self._moved(state, n, batch_mean, spread)

    def update(self, state: StateTensors, obs: Observation, source: SourceModel) -> StateTensors:
        """Every sample updates the score statistics, flagged ones too: a stream whose
        samples all moved (a new domain) cannot lock itself out."""
        if obs.count == 0 or not obs.moments:
            return state
        stacked = {k: v.unsqueeze(0) for k, v in state.items()}
        score = self._scores(obs.moments, stacked, source, lambda rows: rows).unsqueeze(1)
        batch_mean, spread = pooled_moments(score, torch.zeros_like(score))
        return dict(state) | self._moved(state, torch.tensor([float(obs.count)]), batch_mean, spread)  # fmt: skip
