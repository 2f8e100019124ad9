"""Per-group drift signals for the metrics: how each group of streams drifts and adapts.

Groups come from the client's `X-Stream-Group` header; only the first `max_groups`
distinct (valid) names become label values, the rest count as "other", so Prometheus
series stay bounded. Signals are per-sample-weighted EMAs:

- prediction entropy (nats), against the source calibration baseline;
- label-shift magnitude: total variation between the EMA of predicted class
  probabilities and the source prior;
- label-free accuracy estimate: Average Thresholded Confidence (Garg et al. 2022), the
  fraction of samples whose confidence exceeds the threshold calibrated on source data;
- BN-statistics distance: mean over layers and channels of |mu_stream - mu_source| /
  sigma_source, for policies that keep stream statistics.
"""

from __future__ import annotations

import re
import threading
from typing import Any

import torch

from ttaserve.adapters.policy import SourceModel, StateTensors
from ttaserve.server.metrics import ServerMetrics
from ttaserve.server.model_package import Calibration

_GROUP_PATTERN = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
OTHER = "other"


class GroupLabels:
    """Maps client group names to a bounded set of label values."""

    def __init__(self, max_groups: int) -> None:
        self._max = max_groups
        self._known: set[str] = set()
        self._lock = threading.Lock()

    def label(self, group: str | None) -> str:
        if not group or not _GROUP_PATTERN.match(group):
            return OTHER if group else "default"
        with self._lock:
            if group in self._known:
                return group
            if len(self._known) < self._max:
                self._known.add(group)
                return group
        return OTHER


class BnStatisticsDistance:
    """Mean over layers of the mean standardized distance |mu_stream - mu_source| /
    sigma_source of a state's BN means, as one weighted sum over all channels: one value
    per stacked state (R,), or a 0-d tensor for one stream's state."""

    def __init__(self, source: SourceModel) -> None:
        layers = source.layers
        self._keys = [f"bn.{layer}.mean" for layer in range(len(layers))]
        self._mean = torch.cat([n.running_mean for n in layers] + [torch.zeros(0)])
        self._weight = torch.cat([
            1.0 / (len(layers) * n.channels * n.running_var.clamp_min(1e-5).sqrt()) for n in layers
        ] + [torch.zeros(0)])  # fmt: skip

    def __call__(self, state: StateTensors) -> torch.Tensor | None:
        if not self._keys or any(key not in state for key in self._keys):
            return None
        means = torch.cat([state[key] for key in self._keys], dim=-1)
        return ((means - self._mean).abs() * self._weight).sum(-1)


class DriftTracker:
    """Keeps per-group EMAs of drift signals and publishes them as gauges."""

    def __init__(
        self,
        metrics: ServerMetrics,
        source: SourceModel,
        calibration: Calibration | None,
        per_sample_momentum: float = 0.005,
    ) -> None:
        self._metrics = metrics
        self._source = source
        self._atc = calibration.atc_threshold if calibration else None
        self._m = per_sample_momentum
        self._ema: dict[tuple[str, str], torch.Tensor | float] = {}
        self._bn_distance = BnStatisticsDistance(source)
        if calibration is not None:
            metrics.source_entropy.set(calibration.mean_entropy)
            metrics.source_accuracy.set(calibration.accuracy)

    def _update(self, group: str, name: str, value: torch.Tensor | float, n: int) -> Any:
        key = (group, name)
        old = self._ema.get(key)
        momentum = 1.0 - (1.0 - self._m) ** n
        new = value if old is None else (1 - momentum) * old + momentum * value
        self._ema[key] = new
        return new

    def observe(self, group: str, probs: torch.Tensor, raw_logits: torch.Tensor) -> None:
        """Record predictions (probabilities after correction): a request's, or a group's in one batch."""
        n = probs.shape[0]
        if n == 0:
            return
        entropy = -(probs * probs.clamp_min(1e-12).log()).sum(1).mean()
        self._metrics.group_entropy.labels(group=group).set(float(self._update(group, "entropy", entropy, n)))  # fmt: skip
        marginal = self._update(group, "marginal", probs.mean(0), n)
        tv = 0.5 * (marginal - self._source.prior).abs().sum()
        self._metrics.group_label_shift.labels(group=group).set(float(tv))
        if self._atc is not None:
            above = (probs.max(1).values > self._atc).float().mean()
            self._metrics.group_accuracy.labels(group=group).set(float(self._update(group, "atc", above, n)))  # fmt: skip

    def observe_states(self, groups: list[str], states: StateTensors) -> None:
        """Record the stacked states (R, ...) a forward pass used, row r of group groups[r]:
        one distance computation per batch, one gauge update per group."""
        distances = self._bn_distance(states)
        if distances is None:
            return
        rows: dict[str, list[int]] = {}
        for r, group in enumerate(groups):
            rows.setdefault(group, []).append(r)
        for group, group_rows in rows.items():
            value = distances[group_rows].mean() if len(rows) > 1 else distances.mean()
            ema = self._update(group, "bn_distance", value, 64 * len(group_rows))
            self._metrics.group_bn_distance.labels(group=group).set(float(ema))
