"""Which samples may update a stream's state, and which are open-set (unknown classes).

- Entropy margin (EATA/SAR): a sample is reliable when its prediction entropy is below
  `margin * ln K` (0.4 ln K published).
- Energy open-set score (as in OSTTA/UniEnt evaluations): the logsumexp of the calibrated
  logits, standardized against the stream's own running energy statistics (initialized
  from the source calibration), so that a covariate shift that lowers every sample's
  energy does not flag the whole stream. A sample is open-set when its energy is below the
  source 95%-TPR threshold *and* more than `z_threshold` stream deviations below the
  stream's mean. Open-set samples never update the state and are flagged in responses.
- "Wisdom of crowds" (Lee et al., ICCV 2023): a sample whose confidence in the source
  model's predicted class fell under adaptation (adapted < source) is treated as noisy or
  open-set and kept out of updates. Needs the frozen model's logits (a second forward).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ttaserve.adapters.policy import (
    BatchObservation,
    BatchView,
    GateResult,
    Observation,
    SourceModel,
    StateTensors,
)

ENERGY_MEAN_KEY, ENERGY_VAR_KEY = "gate.energy_mean", "gate.energy_var"


def entropy(probs: torch.Tensor) -> torch.Tensor:
    """Prediction entropy (nats) per row."""
    return -(probs * probs.clamp_min(1e-12).log()).sum(1)


def confidence_dropped(adapted_probs: torch.Tensor, source_probs: torch.Tensor) -> torch.Tensor:
    """True where the adapted confidence in the source's predicted class fell below the source's."""
    source_conf, source_label = source_probs.max(1)
    adapted_conf = adapted_probs.gather(1, source_label.unsqueeze(1)).squeeze(1)
    return adapted_conf < source_conf


@dataclass(frozen=True)
class EntropyGate:
    """Accept samples whose prediction entropy is below margin * ln K."""

    margin: float = 0.4

    def gate(self, view: BatchView, logits: torch.Tensor) -> GateResult:
        h = entropy(logits.softmax(1))
        result = GateResult.accept_all(logits.shape[0])
        return GateResult(h < self.margin * math.log(logits.shape[1]), result.open_set, result.open_set_score)  # fmt: skip


@dataclass(frozen=True)
class CrowdGate:
    """Reject samples whose confidence dropped under adaptation (needs source logits)."""

    needs_source_logits: bool = True

    def gate(self, view: BatchView, logits: torch.Tensor) -> GateResult:
        result = GateResult.accept_all(logits.shape[0])
        if view.source_logits is None:
            return result
        dropped = confidence_dropped(logits.softmax(1), view.source_logits.softmax(1))
        return GateResult(~dropped, result.open_set, result.open_set_score)


@dataclass(frozen=True)
class EnergyOpenSetGate:
    """Flag low-energy samples relative to the stream's own energy distribution."""

    z_threshold: float = 2.0
    rate: float = 0.01  # per-sample EMA rate of the stream's energy statistics

    def init_state(self, source: SourceModel) -> StateTensors:
        mean = source.energy_mean if source.energy_mean is not None else 0.0
        std = source.energy_std if source.energy_std is not None else 1.0
        return {ENERGY_MEAN_KEY: torch.tensor([mean]), ENERGY_VAR_KEY: torch.tensor([std**2])}

    def gate(self, view: BatchView, logits: torch.Tensor) -> GateResult:
        source = view.source
        energy = torch.logsumexp(view.logits / source.temperature, 1)
        mean = view.segments.per_sample(view.state[ENERGY_MEAN_KEY].flatten())
        std = view.segments.per_sample(view.state[ENERGY_VAR_KEY].flatten()).clamp_min(1e-6).sqrt()
        z = (mean - energy) / std
        threshold = source.energy_threshold if source.energy_threshold is not None else math.inf
        open_set = (z > self.z_threshold) & (energy < threshold)
        return GateResult(~open_set, open_set, z)

    def update_batch(self, state: StateTensors, obs: BatchObservation, source: SourceModel) -> StateTensors:  # fmt: skip
        """`update` for every request of a forward pass at once (row r from request r)."""
        seg = obs.segments
        mask = obs.mask("known")
        n = obs.count("known")
        energy = torch.logsumexp(obs.logits / source.temperature, 1)
        step = (1 - (1 - self.rate) ** n).unsqueeze(1)
        mean, var = state[ENERGY_MEAN_KEY], state[ENERGY_VAR_KEY]  # (R, 1)
        batch_mean = seg.mean(energy, mask).unsqueeze(1)
        spread = seg.mean((energy - seg.per_sample(batch_mean.squeeze(1))).square(), mask).unsqueeze(1)  # fmt: skip
        batch_var = spread + (batch_mean - mean).square()
        new_mean = (1 - step) * mean + step * batch_mean
        new_var = ((1 - step) * var + step * batch_var).clamp_min(1e-6)
        updated = (n > 0).unsqueeze(1)
        return dict(state) | {ENERGY_MEAN_KEY: torch.where(updated, new_mean, mean), ENERGY_VAR_KEY: torch.where(updated, new_var, var)}  # fmt: skip

    def update(self, state: StateTensors, obs: Observation, source: SourceModel) -> StateTensors:
        known = obs.select("known")
        if known.count == 0:
            return state
        energy = torch.logsumexp(known.logits / source.temperature, 1)
        step = 1 - (1 - self.rate) ** known.count
        mean = state[ENERGY_MEAN_KEY]
        batch_var = energy.var(correction=0) + (energy.mean() - mean).square()
        new_mean = (1 - step) * mean + step * energy.mean()
        new_var = (1 - step) * state[ENERGY_VAR_KEY] + step * batch_var
        return dict(state) | {ENERGY_MEAN_KEY: new_mean, ENERGY_VAR_KEY: new_var.clamp_min(1e-6)}
