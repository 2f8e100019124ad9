"""A policy is a composition of small pieces, not a class hierarchy.

- one *statistics* piece decides what each sample is normalized with (source, batch,
  per-stream EMA, UnMix-TNS components) and how the stream's statistics update; it may
  `prepare` per-forward values that all its layers share (computed once per forward);
- optional *affine* piece (gradient policies) supplies per-stream BN weight and bias;
- *output* pieces correct the logits (label-prior correction, LAME);
- *gate* pieces decide which samples may update the state and which are open-set;
- an optional *guard* resets a stream whose adaptation degenerates.
Each piece keeps its own keys in the stream's flat state dict. Updates run the gates
first (they read the statistics the forward pass used), then the statistics, affine and
output pieces, then the guard. A piece's `update` moves one stream; it may also offer
`update_batch` (the guard: `check_batch`), which moves the stacked states of every stream
of a forward pass at once and must equal `update` row by row
(`tests/unit/test_batched_update.py`); without one, the policy's `update_batch` calls
`update` stream by stream.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from ttaserve.adapters.moments import Segments
from ttaserve.adapters.policy import (
    BatchObservation,
    BatchUpdate,
    BatchView,
    GateResult,
    Normalization,
    Observation,
    PolicyUpdate,
    SourceModel,
    StateTensors,
    update_each,
)
from ttaserve.adapters.stream_norm import StreamNorm


class StatisticsPiece(Protocol):
    def init_state(self, source: SourceModel) -> StateTensors: ...

    def layer_statistics(
        self,
        layer: int,
        state: StateTensors,
        mean: torch.Tensor,
        var: torch.Tensor,
        segments: Segments,
        norm: StreamNorm,
    ) -> Normalization: ...

    def update(self, state: StateTensors, obs: Observation, source: SourceModel) -> StateTensors: ...  # fmt: skip


class AffinePiece(Protocol):
    differentiable: tuple[str, ...]

    def init_state(self, source: SourceModel) -> StateTensors: ...

    def affine(self, layer: int, state: StateTensors, segments: Segments) -> tuple[torch.Tensor, torch.Tensor]: ...  # fmt: skip

    def loss(self, view: BatchView, logits: torch.Tensor, gate: GateResult) -> torch.Tensor: ...

    def update(self, state: StateTensors, obs: Observation, source: SourceModel) -> StateTensors: ...  # fmt: skip


class OutputPiece(Protocol):
    def init_state(self, source: SourceModel) -> StateTensors: ...

    def correct(self, view: BatchView, logits: torch.Tensor) -> torch.Tensor: ...

    def update(self, state: StateTensors, obs: Observation, source: SourceModel) -> StateTensors: ...  # fmt: skip


class GatePiece(Protocol):
    def gate(self, view: BatchView, logits: torch.Tensor) -> GateResult: ...


class GuardPiece(Protocol):
    def init_state(self, source: SourceModel) -> StateTensors: ...

    def check(self, state: StateTensors, obs: Observation, source: SourceModel) -> tuple[StateTensors, str | None]: ...  # fmt: skip


def _params(piece: object) -> dict[str, Any]:
    values = getattr(piece, "__dict__", {})
    return {"piece": type(piece).__name__} | {k: v for k, v in values.items() if isinstance(v, int | float | str | bool | type(None))}  # fmt: skip


@dataclass(frozen=True)
class ComposedPolicy:
    """An `AdaptationPolicy` assembled from pieces (see the module docstring)."""

    name: str
    statistics: StatisticsPiece
    affine: AffinePiece | None = None
    outputs: Sequence[OutputPiece] = ()
    gates: Sequence[GatePiece] = ()
    guard: GuardPiece | None = None
    description: str = ""
    _pieces: tuple[object, ...] = field(init=False, repr=False, default=())

    def __post_init__(self) -> None:
        pieces = (self.statistics, self.affine, *self.outputs, *self.gates, self.guard)
        object.__setattr__(self, "_pieces", tuple(p for p in pieces if p is not None))

    @property
    def needs_source_logits(self) -> bool:
        return any(getattr(p, "needs_source_logits", False) for p in self._pieces)

    @property
    def normalizes_per_sample(self) -> bool:
        """False when the statistics piece only ever gives the source statistics (and no
        affine piece changes them): the runner then runs the frozen model as it is."""
        return getattr(self.statistics, "per_sample", True) or self.affine is not None

    @property
    def differentiable(self) -> tuple[str, ...]:
        return self.affine.differentiable if self.affine else ()

    def params(self) -> dict[str, Any]:
        return {type(p).__name__: _params(p) for p in self._pieces}

    def init_state(self, source: SourceModel) -> StateTensors:
        state: StateTensors = {}
        for piece in self._pieces:
            if hasattr(piece, "init_state"):
                state.update(piece.init_state(source))
        return state

    def prepare(self, state: StateTensors, segments: Segments) -> StateTensors:
        """Per-forward values of the statistics piece (its optional `prepare`), computed once."""
        prepare = getattr(self.statistics, "prepare", None)
        return {} if prepare is None else prepare(state, segments)

    def layer_statistics(
        self,
        layer: int,
        state: StateTensors,
        mean: torch.Tensor,
        var: torch.Tensor,
        segments: Segments,
        norm: StreamNorm,
    ) -> Normalization:
        stats = self.statistics.layer_statistics(layer, state, mean, var, segments, norm)
        if self.affine is None:
            return stats
        weight, bias = self.affine.affine(layer, state, segments)
        return Normalization(stats.mean, stats.var, weight, bias)

    def correct(self, view: BatchView) -> torch.Tensor:
        logits = view.logits
        for piece in self.outputs:
            logits = piece.correct(view, logits)
        return logits

    def gate(self, view: BatchView, logits: torch.Tensor) -> GateResult:
        result = GateResult.accept_all(logits.shape[0])
        for piece in self.gates:
            g = piece.gate(view, logits)
            result = GateResult(
                accepted=result.accepted & g.accepted,
                open_set=result.open_set | g.open_set,
                open_set_score=torch.maximum(result.open_set_score, g.open_set_score),
            )
        return result

    def loss(self, view: BatchView, logits: torch.Tensor, gate: GateResult) -> torch.Tensor | None:
        return self.affine.loss(view, logits, gate) if self.affine else None

    def update(self, state: StateTensors, obs: Observation, source: SourceModel) -> PolicyUpdate:
        new = state
        for piece in self.gates:  # first: they score samples against the state the forward used
            if hasattr(piece, "update"):
                new = piece.update(new, obs, source)
        new = self.statistics.update(new, obs, source)
        if self.affine is not None:
            new = self.affine.update(new, obs, source)
        for piece in self.outputs:
            if hasattr(piece, "update"):
                new = piece.update(new, obs, source)
        if self.guard is None:
            return PolicyUpdate(new)
        new, reason = self.guard.check(new, obs, source)
        if reason is None:
            return PolicyUpdate(new)
        fresh = self.init_state(source)
        fresh.update({k: v for k, v in new.items() if k.startswith(GUARD_PREFIX)})
        return PolicyUpdate(fresh, reason)

    def update_batch(self, state: StateTensors, obs: BatchObservation, source: SourceModel) -> BatchUpdate:  # fmt: skip
        """`update` for many streams at once (row r of the stacked state from request r):
        each piece's batched update where it has one, its `update` row by row otherwise."""
        new = state
        for piece in self.gates:  # first, as in `update`
            if hasattr(piece, "update"):
                new = _update_batch(piece, new, obs, source)
        new = _update_batch(self.statistics, new, obs, source)
        if self.affine is not None:
            new = _update_batch(self.affine, new, obs, source)
        for piece in self.outputs:
            if hasattr(piece, "update"):
                new = _update_batch(piece, new, obs, source)
        count = obs.segments.count
        if self.guard is None:
            return BatchUpdate(new, [None] * count)
        check_batch = getattr(self.guard, "check_batch", None)
        if check_batch is not None:
            new, reasons = check_batch(new, obs, source)
        else:
            checked = [self.guard.check({k: v[r] for k, v in new.items()}, obs.request(r), source) for r in range(count)]  # fmt: skip
            new = {k: torch.stack([row[k] for row, _ in checked]) for k in new}
            reasons = [reason for _, reason in checked]
        if any(reasons):  # reset rows: the source state, with the guard's own counters
            reset = torch.tensor(
                [reason is not None for reason in reasons], device=obs.probs.device
            )
            fresh = self.init_state(source)
            new = {
                k: v
                if k.startswith(GUARD_PREFIX)
                else torch.where(reset.view(-1, *[1] * (v.dim() - 1)), fresh[k], v)  # fmt: skip
                for k, v in new.items()
            }
        return BatchUpdate(new, reasons)


GUARD_PREFIX = "guard."  # the guard's state keys (they survive a reset)


def _update_batch(piece: object, state: StateTensors, obs: BatchObservation, source: SourceModel) -> StateTensors:  # fmt: skip
    batched = getattr(piece, "update_batch", None)
    if batched is not None:
        return batched(state, obs, source)
    return update_each(piece.update, state, obs, source)  # type: ignore[attr-defined]
