"""UnMix-TNS (Tomar et al., ICLR 2024): K statistic components per BN layer.

Each layer keeps K (mean, var) components per stream, initialized around the source
statistics so that their mixture reproduces them exactly. Sample i is softly assigned to the
components by the cosine similarity of its instance mean (temperature 0.07); each
component is mixed with the instance statistics by its assignment, and the sample is
normalized with the moments of that K-component mixture (law of total variance). So a
single image and a class-correlated batch do not drag every statistic at once: each
component follows its own cluster of samples. Components update, without gradients,
towards the (assignment-weighted) pooled statistics of their samples with momentum
1 - (1 - 0.1)^(n/64).

Deviations from the reference code, on purpose: updates and instance terms use moments
(mean and variance with the between-sample spread), so K=1 without the instance term is
exactly the EMA of `ema_batchnorm` (a test pins this); components are initialized from a
fixed seed, with centred noise of unit RMS over the components (the reference draws
mu_k = mu_s + sqrt(0.5 K / (K-1)) sigma_s N(0, 1), whose finite-K mixture is off the
source by ~0.2 sigma per channel), so every stream starts exactly at the source model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ttaserve.adapters.moments import Segments, mix_moments
from ttaserve.adapters.policy import Normalization, Observation, SourceModel, StateTensors
from ttaserve.adapters.stream_norm import StreamNorm


def state_keys(layer: int) -> tuple[str, str]:
    return f"unmix.{layer}.mean", f"unmix.{layer}.var"


@dataclass(frozen=True)
class UnmixStatistics:
    """K-component per-stream BN statistics with instance mixing (policy `unmix`)."""

    components: int = 16
    temperature: float = 0.07
    momentum: float = 0.1  # per 64 samples
    init_coefficient: float = 0.5
    instance_term: bool = True
    update_from: str = "known"
    seed: int = 0

    def init_state(self, source: SourceModel) -> StateTensors:
        gen = torch.Generator().manual_seed(self.seed)
        k, c0 = self.components, self.init_coefficient
        state: StateTensors = {}
        for layer, norm in enumerate(source.layers):
            mean_key, var_key = state_keys(layer)
            mu, var = norm.running_mean, norm.running_var
            if k == 1:
                state[mean_key], state[var_key] = mu.unsqueeze(0).clone(), var.unsqueeze(0).clone()
                continue
            noise = torch.randn(k, mu.numel(), generator=gen)
            noise = noise - noise.mean(0)  # centred, unit RMS: the mixture is exactly the source
            noise = noise / noise.square().mean(0).sqrt()
            state[mean_key] = mu + math.sqrt(c0) * var.sqrt() * noise
            state[var_key] = (1 - c0) * var.expand(k, -1).clone()
        return state

    def _assignment(self, mean: torch.Tensor, components: torch.Tensor) -> torch.Tensor:
        """(N, K) soft assignment of samples to their own stream's components (N, K, C)."""
        sim = torch.nn.functional.cosine_similarity(mean.unsqueeze(1), components, dim=2)
        return (sim / self.temperature).softmax(1)

    def layer_statistics(
        self,
        layer: int,
        state: StateTensors,
        mean: torch.Tensor,
        var: torch.Tensor,
        segments: Segments,
        norm: StreamNorm,
    ) -> Normalization:
        mean_key, var_key = state_keys(layer)
        comp_mean = segments.per_sample(state[mean_key])  # (N, K, C)
        comp_var = segments.per_sample(state[var_key])
        if self.instance_term:
            p = self._assignment(mean, comp_mean).unsqueeze(2)  # (N, K, 1)
            comp_mean, comp_var = mix_moments(comp_mean, comp_var, mean.unsqueeze(1), var.unsqueeze(1), p)  # fmt: skip
        mu = comp_mean.mean(1)
        sigma2 = comp_var.mean(1) + (comp_mean - mu.unsqueeze(1)).square().mean(1)
        return Normalization(mu, sigma2.clamp_min(0.0))

    def update(self, state: StateTensors, obs: Observation, source: SourceModel) -> StateTensors:
        obs = obs.select(self.update_from)
        n = obs.count
        if n == 0:
            return state
        rate = 1 - (1 - self.momentum) ** (n / 64)
        new_state = dict(state)
        for layer, (mean, var) in enumerate(obs.moments):
            mean_key, var_key = state_keys(layer)
            comp_mean, comp_var = state[mean_key], state[var_key]  # (K, C)
            p = self._assignment(mean, comp_mean.unsqueeze(0).expand(n, -1, -1))  # (n, K)
            weight = p.sum(0)  # (K,)
            safe = weight.clamp_min(1e-12).unsqueeze(1)
            obs_mean = (p.T @ mean) / safe
            spread = (mean.unsqueeze(1) - obs_mean.unsqueeze(0)).square()  # (n, K, C)
            obs_var = (p.unsqueeze(2) * (var.unsqueeze(1) + spread)).sum(0) / safe
            share = (rate * weight / n).unsqueeze(1)  # the reference's m * mean_i P_ik
            new_mean, new_var = mix_moments(comp_mean, comp_var, obs_mean, obs_var, share)
            new_state[mean_key], new_state[var_key] = new_mean, new_var.clamp_min(0.0)
        return new_state
