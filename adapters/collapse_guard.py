"""Collapse guard: resets a stream whose adaptation degenerates.

Tracks per stream an EMA of the mean prediction entropy of its samples (SAR's model
recovery: reset when it falls below a floor, i.e. the stream became overconfident) and an
EMA of the fraction of samples the gate accepted (too few reliable samples: the state is
being fed noise). Optionally resets every `reset_every` updates (RDumb). A reset returns
the stream to the source state; the guard's own counters survive it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ttaserve.adapters.policy import BatchObservation, Observation, SourceModel, StateTensors
from ttaserve.adapters.reliability_gate import entropy

ENTROPY_KEY, RELIABLE_KEY, UPDATES_KEY = "guard.entropy_ema", "guard.reliable_ema", "guard.updates"
COLLAPSES = ("entropy_collapse", "few_reliable")  # resets that restart the guard's counters too


@dataclass(frozen=True)
class CollapseGuard:
    """Reset on entropy collapse, starvation of reliable samples, or periodically."""

    entropy_floor: float = 0.03  # fraction of ln K
    min_reliable: float = 0.02
    momentum: float = 0.1  # per request
    warmup_updates: int = 10
    reset_every: int | None = None

    def init_state(self, source: SourceModel) -> StateTensors:
        start = source.mean_entropy if source.mean_entropy is not None else 0.5 * math.log(source.num_classes)  # fmt: skip
        return {ENTROPY_KEY: torch.tensor([start]), RELIABLE_KEY: torch.ones(1), UPDATES_KEY: torch.zeros(1)}  # fmt: skip

    def check_batch(self, state: StateTensors, obs: BatchObservation, source: SourceModel) -> tuple[StateTensors, list[str | None]]:  # fmt: skip
        """`check` for every request of a forward pass at once (row r from request r)."""
        seg = obs.segments
        mask = obs.mask("known")
        n = obs.count("known")
        m = self.momentum
        h = seg.mean(entropy(obs.probs), mask).unsqueeze(1)
        reliable = seg.mean(obs.accepted.float(), mask).unsqueeze(1)
        seen = (n > 0).unsqueeze(1)
        new = dict(state)
        new[ENTROPY_KEY] = torch.where(seen, (1 - m) * state[ENTROPY_KEY] + m * h, state[ENTROPY_KEY])  # fmt: skip
        new[RELIABLE_KEY] = torch.where(seen, (1 - m) * state[RELIABLE_KEY] + m * reliable, state[RELIABLE_KEY])  # fmt: skip
        new[UPDATES_KEY] = state[UPDATES_KEY] + seen.float()
        floor = self.entropy_floor * math.log(obs.probs.shape[1])
        rows = zip(seen[:, 0].tolist(), new[UPDATES_KEY][:, 0].tolist(), new[ENTROPY_KEY][:, 0].tolist(), new[RELIABLE_KEY][:, 0].tolist(), strict=True)  # fmt: skip
        reasons = [self._reason(int(updates), h_ema, reliable_ema, floor) if counted else None for counted, updates, h_ema, reliable_ema in rows]  # fmt: skip
        collapsed = [reason in COLLAPSES for reason in reasons]
        if any(collapsed):  # the guard's own counters restart too (as in `check`)
            rows_reset = torch.tensor(collapsed, device=obs.probs.device).unsqueeze(1)
            fresh = self.init_state(source)
            for key in (ENTROPY_KEY, RELIABLE_KEY, UPDATES_KEY):
                new[key] = torch.where(rows_reset, fresh[key], new[key])
        return new, reasons

    def check(self, state: StateTensors, obs: Observation, source: SourceModel) -> tuple[StateTensors, str | None]:  # fmt: skip
        known = obs.select("known")
        if known.count == 0:
            return state, None
        m = self.momentum
        h = entropy(known.probs).mean()
        reliable = known.accepted.float().mean()
        new = dict(state)
        new[ENTROPY_KEY] = (1 - m) * state[ENTROPY_KEY] + m * h
        new[RELIABLE_KEY] = (1 - m) * state[RELIABLE_KEY] + m * reliable
        new[UPDATES_KEY] = state[UPDATES_KEY] + 1
        floor = self.entropy_floor * math.log(known.probs.shape[1])
        reason = self._reason(int(new[UPDATES_KEY]), float(new[ENTROPY_KEY]), float(new[RELIABLE_KEY]), floor)  # fmt: skip
        return (self.init_state(source) if reason in COLLAPSES else new), reason

    def _reason(self, updates: int, entropy_ema: float, reliable_ema: float, floor: float) -> str | None:  # fmt: skip
        """Why a stream with these counters after its update is reset (None: it is not)."""
        if self.reset_every and updates % self.reset_every == 0:
            return "periodic"
        if updates < self.warmup_updates:
            return None
        if entropy_ema < floor:
            return "entropy_collapse"
        if reliable_ema < self.min_reliable:
            return "few_reliable"
        return None
