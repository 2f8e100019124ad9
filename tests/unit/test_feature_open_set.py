"""The feature-statistics open-set gate (`adapters/feature_open_set.py`)."""

from __future__ import annotations

import torch

from ttaserve.adapters.ema_batchnorm import state_keys
from ttaserve.adapters.feature_open_set import (
    FEATURE_MEAN_KEY,
    FEATURE_SEEN_KEY,
    FEATURE_VAR_KEY,
    FeatureOpenSetGate,
    feature_layers,
)
from ttaserve.adapters.moments import Segments
from ttaserve.adapters.policy import BatchObservation, BatchView, Observation, SourceModel

LAYERS, CHANNELS = 4, 8


def _source() -> SourceModel:
    layers = [torch.nn.BatchNorm2d(CHANNELS) for _ in range(LAYERS)]
    return SourceModel(layers, torch.full((3,), 1 / 3), 3)  # type: ignore[arg-type]


def _state(gate: FeatureOpenSetGate, seen: float, mean: float = 0.0, var: float = 1.0) -> dict[str, torch.Tensor]:  # fmt: skip
    """One stream's stacked (1, ...) state: unit BN statistics, the gate's score statistics."""
    state = {FEATURE_MEAN_KEY: torch.tensor([[mean]]), FEATURE_VAR_KEY: torch.tensor([[var]]), FEATURE_SEEN_KEY: torch.tensor([[seen]])}  # fmt: skip
    for layer in range(LAYERS):
        mean_key, var_key = state_keys(layer)
        state[mean_key], state[var_key] = torch.zeros(1, CHANNELS), torch.ones(1, CHANNELS)
    return state


def _moments(offsets: list[float], seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per-sample means near 0 (spread 0.3), each sample shifted by its offset, every layer."""
    g = torch.Generator().manual_seed(seed)
    shift = torch.tensor(offsets).unsqueeze(1)
    return [(torch.randn(len(offsets), CHANNELS, generator=g) * 0.3 + shift, torch.ones(len(offsets), CHANNELS)) for _ in range(LAYERS)]  # fmt: skip


def _gate(gate: FeatureOpenSetGate, state, moments, sizes):  # type: ignore[no-untyped-def]
    logits = torch.zeros(sum(sizes), 3)
    view = BatchView(logits, None, state, Segments.from_sizes(sizes), _source(), moments=moments)
    return gate.gate(view, logits)


def test_feature_layers_take_the_middle_of_the_network():
    assert list(feature_layers(21, (0.55, 0.7))) == [12, 13, 14]
    assert list(feature_layers(1, (0.55, 0.7))) == [0]


def test_single_images_far_from_a_warm_streams_statistics_are_flagged():
    gate = FeatureOpenSetGate(depth=(0.0, 1.0))
    # a warm stream whose log-scores run at mean log(0.09), spread 0.5
    state = _state(gate, seen=1000, mean=float(torch.tensor(0.09).log()), var=0.25)
    near = _gate(gate, state, _moments([0.0]), [1])
    far = _gate(gate, state, _moments([2.0]), [1])
    assert not near.open_set.item() and near.accepted.item()
    assert far.open_set.item() and not far.accepted.item()
    assert far.open_set_score.item() > near.open_set_score.item()


def test_a_young_stream_flags_nothing():
    gate = FeatureOpenSetGate(depth=(0.0, 1.0), warmup_samples=64)
    result = _gate(gate, _state(gate, seen=10, mean=-2.4, var=0.25), _moments([2.0]), [1])
    assert not result.open_set.item()


def test_a_request_is_scored_against_its_own_samples_so_a_domain_switch_flags_none():
    gate = FeatureOpenSetGate(depth=(0.0, 1.0))
    state = _state(gate, seen=1000, mean=-2.4, var=0.25)
    shifted = _gate(gate, state, _moments([2.0] * 32), [32])  # every sample moved alike
    assert not shifted.open_set.any()
    mixed = _gate(gate, state, _moments([0.0] * 26 + [3.0] * 6), [32])  # a fifth unknown
    assert mixed.open_set.tolist() == [False] * 26 + [True] * 6


def test_batched_update_equals_the_update_of_each_stream():
    gate = FeatureOpenSetGate(depth=(0.0, 1.0))
    source = _source()
    rows = [_state(gate, seen=0.0), _state(gate, seen=500, mean=-2.0, var=0.3)]
    stacked = {k: torch.cat([r[k] for r in rows]) for k in rows[0]}
    moments = _moments([0.0, 0.5, 1.0, 0.2, 0.1], seed=3)
    sizes = [2, 3]
    flags = torch.zeros(5, dtype=torch.bool)
    obs = BatchObservation(moments, torch.full((5, 3), 1 / 3), torch.zeros(5, 3), ~flags, flags, Segments.from_sizes(sizes))  # fmt: skip
    batched = gate.update_batch(stacked, obs, source)
    for r, (start, end) in enumerate([(0, 2), (2, 5)]):
        one = {k: v[0] for k, v in rows[r].items()}
        sample_moments = [(m[start:end], v[start:end]) for m, v in moments]
        single = Observation(sample_moments, obs.probs[start:end], obs.logits[start:end], obs.accepted[start:end], obs.open_set[start:end])  # fmt: skip
        want = gate.update(one, single, source)
        for key in (FEATURE_MEAN_KEY, FEATURE_VAR_KEY, FEATURE_SEEN_KEY):
            torch.testing.assert_close(batched[key][r], want[key], rtol=1e-5, atol=1e-6)
    assert batched[FEATURE_SEEN_KEY].flatten().tolist() == [2.0, 503.0]
    # a fresh stream's first update takes the request's score statistics as they are
    first = gate.update({k: v[0] for k, v in rows[0].items()}, Observation([(m[:2], v[:2]) for m, v in moments], obs.probs[:2], obs.logits[:2], obs.accepted[:2], obs.open_set[:2]), source)  # fmt: skip
    assert torch.isfinite(first[FEATURE_VAR_KEY]).all() and first[FEATURE_VAR_KEY].item() > 0


def test_the_frozen_model_gives_no_moments_and_flags_nothing():
    gate = FeatureOpenSetGate()
    logits = torch.zeros(3, 3)
    view = BatchView(logits, None, _state(gate, seen=1000), Segments.from_sizes([3]), _source())
    assert not gate.gate(view, logits).open_set.any()
