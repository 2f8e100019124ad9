"""The contract every adaptation policy fulfils, on tensors only.

A policy turns a stream's state (a flat dict of named tensors) and a batch's per-sample
moments into normalization statistics, corrects and gates the outputs, and computes the
stream's next state as a pure function of (old state, observation). That purity is what
lets a store re-apply an update after a compare-and-set conflict without a second forward.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

import torch

from ttaserve.adapters.moments import Segments, mix_moments, segment_sum
from ttaserve.adapters.stream_norm import StreamNorm

if TYPE_CHECKING:
    from ttaserve.adapters.label_shift_adapter import LabelShiftAdapter

StateTensors = dict[str, torch.Tensor]


class Normalization(NamedTuple):
    """Per-sample (N, C) or shared (1, C) statistics, and optionally per-sample affine."""

    mean: torch.Tensor
    var: torch.Tensor
    weight: torch.Tensor | None = None
    bias: torch.Tensor | None = None


def source_mixed_normalization(
    norm: StreamNorm,
    mean: torch.Tensor,
    var: torch.Tensor,
    alpha: float | torch.Tensor,
    segments: Segments,
) -> Normalization:
    """Per-request statistics (R, C) mixed with the layer's source statistics by `alpha`
    (one value, or (R, 1) per request), per sample (`Segments.broadcast`). With alpha = 0
    the result is exactly the source statistics."""
    mu, sigma2 = mix_moments(norm.running_mean, norm.running_var, mean, var, alpha)
    return Normalization(segments.broadcast(mu), segments.broadcast(sigma2).clamp_min(0.0))


@dataclass(frozen=True)
class SourceModel:
    """What policies know of the frozen source model."""

    layers: list[StreamNorm]  # stream-norm layers, in layer-index order
    prior: torch.Tensor  # (K,) source label distribution
    num_classes: int
    energy_threshold: float | None = None  # logsumexp at 95% TPR on source data
    energy_mean: float | None = None  # mean and std of logsumexp on source data
    energy_std: float | None = None
    mean_entropy: float | None = None  # mean prediction entropy on source data
    confusion: torch.Tensor | None = None  # (K, K) P(pred=i, true=j) on source data
    temperature: float = 1.0
    label_adapter: LabelShiftAdapter | None = None  # trained label shift adapter, if packaged
    # per layer: class-conditional input means and variances (K, C) on source data
    class_moments: list[tuple[torch.Tensor, torch.Tensor]] | None = None

    def layer_statistics(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.layers[layer].running_mean, self.layers[layer].running_var


@dataclass(frozen=True)
class Observation:
    """What one request contributes to its stream's next state: all its samples.

    `accepted` marks the samples the gate let update the state, `open_set` those judged
    unknown; pieces pick the subset they learn from with `select`. `grads` holds the
    gradients of the policy's loss w.r.t. its differentiable state tensors.
    """

    moments: list[tuple[torch.Tensor, torch.Tensor]]  # per layer: (n, C) means and variances
    probs: torch.Tensor  # (n, K) corrected class probabilities
    logits: torch.Tensor  # (n, K) uncorrected model logits
    accepted: torch.Tensor  # (n,) bool
    open_set: torch.Tensor  # (n,) bool
    grads: dict[str, torch.Tensor] = field(default_factory=dict)
    # subsets already selected (pieces of one update select the same one): a memo that
    # `replace` does not carry over, so it always matches the fields
    _selected: dict[str, Observation] = field(default_factory=dict, init=False, repr=False, compare=False)  # fmt: skip

    @property
    def requested(self) -> int:
        return int(self.probs.shape[0])

    def mask(self, subset: str) -> torch.Tensor:
        """'all', 'known' (not open-set) or 'accepted' samples."""
        if subset == "all":
            return torch.ones_like(self.accepted)
        if subset == "known":
            return ~self.open_set
        if subset == "accepted":
            return self.accepted
        raise ValueError(f"unknown sample subset {subset!r}")

    def select(self, subset: str) -> Observation:
        """The observation restricted to a subset of its samples (itself when that is all)."""
        if subset == "all":
            return self
        selected = self._selected.get(subset)
        if selected is not None:
            return selected
        keep = self.mask(subset)
        if bool(keep.all()):
            return self
        rows = keep if bool(keep.any()) else slice(0, 0)  # none: the same empty tensors, as views
        selected = replace(
            self,
            moments=[(m[rows], v[rows]) for m, v in self.moments],
            probs=self.probs[rows],
            logits=self.logits[rows],
            accepted=self.accepted[rows],
            open_set=self.open_set[rows],
        )
        self._selected[subset] = selected
        return selected

    @property
    def count(self) -> int:
        return int(self.probs.shape[0])


@dataclass(frozen=True)
class BatchObservation:
    """What the requests of one forward pass contribute to their streams' next states.

    Request r (a segment of the samples) belongs to the stream whose state is row r of
    the stacked states it updates: at most one request per stream (requests of one stream
    that met in a batch update in arrival order, one `update_batch` each). Pieces update all
    streams at once with per-sample masks where `Observation` selects rows.
    """

    moments: list[tuple[torch.Tensor, torch.Tensor]]  # per layer: (N, C) means and variances
    probs: torch.Tensor  # (N, K) corrected class probabilities
    logits: torch.Tensor  # (N, K) uncorrected model logits
    accepted: torch.Tensor  # (N,) bool
    open_set: torch.Tensor  # (N,) bool
    segments: Segments
    grads: dict[str, torch.Tensor] = field(default_factory=dict)  # per request (R, ...)
    # masks and counts already computed (every piece of one update asks for them): a memo
    _memo: dict[str, torch.Tensor] = field(default_factory=dict, init=False, repr=False, compare=False)  # fmt: skip

    def mask(self, subset: str) -> torch.Tensor:
        """(N,) float: 1 for the samples of `subset` ('all', 'known', 'accepted')."""
        mask = self._memo.get(subset)
        if mask is not None:
            return mask
        if subset == "all":
            mask = torch.ones(self.accepted.shape[0], device=self.accepted.device)
        elif subset == "known":
            mask = (~self.open_set).float()
        elif subset == "accepted":
            mask = self.accepted.float()
        else:
            raise ValueError(f"unknown sample subset {subset!r}")
        self._memo[subset] = mask
        return mask

    def count(self, subset: str) -> torch.Tensor:
        """(R,) float: how many samples of `subset` each request has."""
        key = f"count.{subset}"
        count = self._memo.get(key)
        if count is None:
            count = self._memo[key] = segment_sum(self.mask(subset).unsqueeze(1), self.segments).squeeze(1)  # fmt: skip
        return count

    def request(self, r: int) -> Observation:
        """Request r's `Observation` (for pieces that update one stream at a time)."""
        offsets = self.segments.offsets
        rows = slice(offsets[r], offsets[r + 1])
        return Observation(
            moments=[(m[rows], v[rows]) for m, v in self.moments],
            probs=self.probs[rows],
            logits=self.logits[rows],
            accepted=self.accepted[rows],
            open_set=self.open_set[rows],
            grads={k: g[r] for k, g in self.grads.items()},
        )


def update_each(
    update: Callable[[StateTensors, Observation, SourceModel], StateTensors],
    state: StateTensors,
    obs: BatchObservation,
    source: SourceModel,
) -> StateTensors:
    """A batched update from a piece's one-stream `update`, request by request (for pieces
    whose update has no batched form)."""
    count = obs.segments.count
    if count == 0 or not state:
        return state
    rows = [update({k: v[r] for k, v in state.items()}, obs.request(r), source) for r in range(count)]  # fmt: skip
    return {k: torch.stack([row[k] for row in rows]) for k in rows[0]}


@dataclass(frozen=True)
class GateResult:
    """Per-sample decisions: may the sample update the state, and is it open-set."""

    accepted: torch.Tensor  # (N,) bool
    open_set: torch.Tensor  # (N,) bool
    open_set_score: torch.Tensor  # (N,) float, higher = more likely unknown

    @classmethod
    def accept_all(cls, n: int) -> GateResult:
        return cls(
            accepted=torch.ones(n, dtype=torch.bool),
            open_set=torch.zeros(n, dtype=torch.bool),
            open_set_score=torch.zeros(n),
        )


class BatchUpdate(NamedTuple):
    """Streams' next states, stacked (R, ...), and why each was reset (None: not reset)."""

    state: StateTensors
    reset_reasons: list[str | None]


class PolicyUpdate(NamedTuple):
    """A stream's next state, and why it was reset to the source (None: not reset)."""

    state: StateTensors
    reset_reason: str | None = None


@dataclass
class BatchView:
    """What output corrections and gates see of one forward pass."""

    logits: torch.Tensor  # (N, K) raw model logits
    features: torch.Tensor | None  # (N, D) penultimate features, when the model exposes them
    state: StateTensors  # stacked per request (R, ...)
    segments: Segments
    source: SourceModel
    source_logits: torch.Tensor | None = None  # (N, K) frozen-model logits, when asked for
    # per layer: (N, C) per-sample input means and variances (empty: the frozen model ran)
    moments: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)


class AdaptationPolicy(Protocol):
    """A named, parameterized adaptation policy. Implementations are small and pure."""

    name: str
    differentiable: tuple[str, ...]  # state-key prefixes that get gradients (empty: forward only)
    needs_source_logits: bool  # gates that compare with the frozen model (a second forward)
    # False: every sample is normalized with the source statistics, so the forward pass is
    # the frozen model's (no per-sample moments are computed; `layer_statistics` is unused)
    normalizes_per_sample: bool

    def params(self) -> dict[str, Any]:
        """The policy's parameters, recorded in each stream's state header."""

    def init_state(self, source: SourceModel) -> StateTensors:
        """A fresh stream's state: the source model's behaviour."""

    def prepare(self, state: StateTensors, segments: Segments) -> StateTensors:
        """Per-forward values that every layer's `layer_statistics` shares, computed once
        from the stacked states (pure). The runner passes `state | prepare(state, segments)`
        to `layer_statistics`; the keys name no stream state and are never stored."""

    def layer_statistics(
        self,
        layer: int,
        state: StateTensors,
        mean: torch.Tensor,
        var: torch.Tensor,
        segments: Segments,
        norm: StreamNorm,
    ) -> Normalization:
        """Statistics to normalize each sample with; `state` tensors are stacked per request."""

    def correct(self, view: BatchView) -> torch.Tensor:
        """Output-level correction of the logits (label prior, LAME); identity by default."""

    def gate(self, view: BatchView, logits: torch.Tensor) -> GateResult:
        """Which samples may update the state, and which are open-set."""

    def loss(self, view: BatchView, logits: torch.Tensor, gate: GateResult) -> torch.Tensor | None:
        """The loss whose gradients reach `differentiable` state tensors (None: no gradient)."""

    def update(self, state: StateTensors, observation: Observation, source: SourceModel) -> PolicyUpdate:  # fmt: skip
        """The stream's next state from its accepted samples (pure)."""

    def update_batch(self, state: StateTensors, observation: BatchObservation, source: SourceModel) -> BatchUpdate:  # fmt: skip
        """`update` for many streams at once: row r of the stacked `state` from request r
        (pure; equal to `update` row by row up to float rounding)."""
