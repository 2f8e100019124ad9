"""Drift signals: one BN-statistics distance computation per batch, one gauge per group."""

import torch
from prometheus_client import generate_latest

from ttaserve.adapters.registry import build_policy
from ttaserve.server.drift import BnStatisticsDistance, DriftTracker
from ttaserve.server.metrics import ServerMetrics
from ttaserve.server.model_runner import ModelRunner, stack_states


def _gauge(metrics: ServerMetrics, group: str) -> float:
    text = generate_latest(metrics.registry).decode()
    prefix = f'ttaserve_group_bn_statistics_distance{{group="{group}"}} '
    return float(next(line for line in text.splitlines() if line.startswith(prefix)).split()[-1])


def _moved(state, shift: float):
    return {k: v + shift if k.endswith(".mean") else v for k, v in state.items()}


def test_stacked_distances_equal_each_state_alone(random_model):
    runner = ModelRunner(random_model)
    fresh = build_policy("bn").init_state(runner.source)
    states = [fresh, _moved(fresh, 0.5), _moved(fresh, -2.0)]
    distance = BnStatisticsDistance(runner.source)
    stacked = distance(stack_states(states))
    alone = torch.stack([distance(s) for s in states])
    torch.testing.assert_close(stacked, alone)
    assert float(stacked[0]) == 0.0 and 0 < float(stacked[1]) < float(stacked[2])


def test_each_group_gauge_follows_its_own_streams(random_model):
    runner, metrics = ModelRunner(random_model), ServerMetrics()
    drift = DriftTracker(metrics, runner.source, calibration=None)
    fresh = build_policy("bn").init_state(runner.source)
    states = [fresh, _moved(fresh, 1.0), fresh]
    drift.observe_states(["clear", "fog", "clear"], stack_states(states))
    assert _gauge(metrics, "clear") == 0.0
    expected = float(BnStatisticsDistance(runner.source)(states[1]))
    assert abs(_gauge(metrics, "fog") - expected) < 1e-6
