"""Label-shift correction: an online estimate of each stream's label distribution.

The estimate pi_t replaces the source prior pi_s in the model's posterior:
logits + log pi - log pi_s (Saerens et al. 2002). Two estimators:

- `em` (default): online Saerens EM. For each request's known (not open-set) samples,
  q_i ∝ p_i * pi_t / pi_s with p_i the temperature-calibrated posterior; pi_t moves to
  the mean of q with a per-sample rate (its fixed point is the EM estimate), and is
  shrunk towards uniform (ROID-style smoothing) so no class is ever ruled out. Only
  samples not judged open-set count. (Per-sample confidence weighting was tried and
  dropped: it biases the estimate towards the easily recognised classes.)
- `bbse`: black-box shift estimation (Lipton et al. 2018): an EMA of hard-prediction
  frequencies mu, and pi_t ∝ clip(C^-1 mu) * pi_s with the source confusion matrix C
  from the model package.

With `batch_em`, a request of several images also runs a few MAP-EM steps on its own
samples (a Dirichlet prior of `batch_prior` pseudo-samples centred on pi_t), so a
class-correlated batch is corrected at once, while a single image barely moves it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ttaserve.adapters.moments import segment_sum
from ttaserve.adapters.policy import (
    BatchObservation,
    BatchView,
    Observation,
    SourceModel,
    StateTensors,
    update_each,
)

PRIOR_KEY = "prior.estimate"
PREDICTED_KEY = "prior.predicted"


def em_prior(
    probs: torch.Tensor, prior: torch.Tensor, source_prior: torch.Tensor, steps: int = 20
) -> torch.Tensor:
    """Saerens EM: the label prior that explains posteriors `probs` (n, K) under shift."""
    for _ in range(steps):
        q = probs * (prior / source_prior)
        q = q / q.sum(1, keepdim=True)
        prior = q.mean(0)
    return prior


@dataclass(frozen=True)
class PriorCorrection:
    """Online label-prior estimate per stream, applied as a logit correction."""

    method: str = "em"  # "em" or "bbse"
    rate: float = 0.005  # per-sample update rate of the estimate
    smoothing: float = 1e-3  # shrink towards uniform after each update
    batch_em: bool = True
    batch_prior: float = 64.0  # pseudo-samples of pi_t in a request's own EM
    batch_em_steps: int = 5
    min_batch: int = 8

    def init_state(self, source: SourceModel) -> StateTensors:
        k = source.num_classes
        return {PRIOR_KEY: source.prior.clone(), PREDICTED_KEY: torch.full((k,), 1.0 / k)}

    def correct(self, view: BatchView, logits: torch.Tensor) -> torch.Tensor:
        prior = view.state[PRIOR_KEY]  # (R, K)
        if self.batch_em:
            prior = self._request_priors(view, logits, prior, view.source)
        log_prior = view.segments.per_sample(prior.clamp_min(1e-8).log())
        return logits + log_prior - view.source.prior.log()

    def _request_priors(self, view: BatchView, logits: torch.Tensor, prior: torch.Tensor, source: SourceModel) -> torch.Tensor:  # fmt: skip
        """MAP-EM per request: pi_r = (kappa * pi_t + sum_i q_i) / (kappa + n_r)."""
        seg = view.segments
        big = (seg.sizes >= self.min_batch).unsqueeze(1)
        if not bool(big.any()):  # no request large enough: every estimate stays pi_t
            return prior
        probs = (logits / source.temperature).softmax(1)
        estimate = prior
        for _ in range(self.batch_em_steps):
            q = probs * (estimate / source.prior)[seg.index]
            q = q / q.sum(1, keepdim=True)
            updated = (self.batch_prior * prior + segment_sum(q, seg)) / (self.batch_prior + seg.sizes.unsqueeze(1))  # fmt: skip
            estimate = torch.where(big, updated, prior)
        return estimate

    def update_batch(self, state: StateTensors, obs: BatchObservation, source: SourceModel) -> StateTensors:  # fmt: skip
        """`update` for every request of a forward pass at once (row r from request r)."""
        if self.method == "bbse" and source.confusion is not None:
            return update_each(self.update, state, obs, source)
        seg = obs.segments
        mask = obs.mask("known")
        n = obs.count("known")
        k = source.num_classes
        prior = state[PRIOR_KEY]  # (R, K)
        probs = (obs.logits / source.temperature).softmax(1)
        step = (1 - (1 - self.rate) ** n).unsqueeze(1)
        q = probs * seg.per_sample(prior / source.prior)
        q = q / q.sum(1, keepdim=True)
        estimate = (1 - step) * prior + step * seg.mean(q, mask)
        estimate = (estimate + self.smoothing / k) / (1 + self.smoothing)
        estimate = estimate / estimate.sum(1, keepdim=True)
        return dict(state) | {PRIOR_KEY: torch.where((n > 0).unsqueeze(1), estimate, prior)}

    def update(self, state: StateTensors, obs: Observation, source: SourceModel) -> StateTensors:
        obs = obs.select("known")
        n = obs.count
        if n == 0:
            return state
        k = source.num_classes
        prior = state[PRIOR_KEY]
        probs = (obs.logits / source.temperature).softmax(1)
        step = 1 - (1 - self.rate) ** n
        new_state = dict(state)
        if self.method == "bbse" and source.confusion is not None:
            hard = torch.nn.functional.one_hot(probs.argmax(1), k).float().mean(0)
            predicted = (1 - step) * state[PREDICTED_KEY] + step * hard
            weights = torch.linalg.lstsq(source.confusion, predicted.unsqueeze(1)).solution.squeeze(1)  # fmt: skip
            target = (weights.clamp_min(0) * source.prior).clamp_min(1e-8)
            new_state[PREDICTED_KEY] = predicted
            estimate = target / target.sum()
        else:
            q = probs * (prior / source.prior)
            q = q / q.sum(1, keepdim=True)
            # Plain mean of q: weighting samples by their confidence biases the fixed point
            # towards easily recognised classes (measured: 0.19 for a 0.10 class).
            estimate = (1 - step) * prior + step * q.mean(0)
        estimate = (estimate + self.smoothing / k) / (1 + self.smoothing)
        new_state[PRIOR_KEY] = estimate / estimate.sum()
        return new_state
