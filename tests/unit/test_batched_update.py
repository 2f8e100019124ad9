"""A policy's `update_batch` moves every stream of a forward pass at once; it must give,
row by row, what its one-stream `update` gives (the server uses the first, a
compare-and-set retry and older callers the second)."""

import dataclasses

import pytest
import torch

from ttaserve.adapters.collapse_guard import ENTROPY_KEY, UPDATES_KEY
from ttaserve.adapters.moments import Segments
from ttaserve.adapters.policy import BatchObservation, GateResult
from ttaserve.adapters.registry import POLICIES, build_policy
from ttaserve.server.model_runner import ModelRunner, stack_states

# 1 image, a small request, one large enough for the switch gate and the diversity
# estimate, and one whose samples are all open-set (nothing may update that stream)
SIZES = [1, 3, 20, 4]


def _observation(runner, policy, states, sizes, seed=0, open_set_requests=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(sum(sizes), 3, 32, 32, generator=g) * 1.5 + 0.3
    segments = Segments.from_sizes(sizes)
    result = runner.forward(x, segments, policy, states)
    open_set = torch.zeros(sum(sizes), dtype=torch.bool)
    if open_set_requests:
        open_set[sum(sizes[:-1]) :] = True  # the last request: all open-set
        open_set[1] = True  # and one sample of the second
    gate = GateResult(result.gate.accepted & ~open_set, open_set, result.gate.open_set_score)
    return BatchObservation(
        moments=result.moments,
        probs=result.probs,
        logits=result.raw_logits,
        accepted=gate.accepted,
        open_set=gate.open_set,
        segments=segments,
        grads=result.grads,
    )


def _streams(runner, policy, count):
    """Streams with different histories: each has taken a few updates of its own."""
    states = []
    for r in range(count):
        state = policy.init_state(runner.source)
        for step in range(3 * r):
            obs = _observation(runner, policy, [state], [8], seed=100 * r + step, open_set_requests=False)  # fmt: skip
            state = policy.update(state, obs.request(0), runner.source).state
        states.append(state)
    return states


# the registered policies, and the statistics piece with its domain-switch gate always open
VARIANTS = {name: {} for name in POLICIES} | {"bn_switching": {"switch_gate": (0.0, 1e-6), "class_balanced": True}}  # fmt: skip


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_update_batch_equals_update_row_by_row(random_model, name):
    runner = ModelRunner(random_model)
    policy = build_policy(name.removesuffix("_switching"), **VARIANTS[name])
    states = _streams(runner, policy, len(SIZES))
    obs = _observation(runner, policy, states, SIZES)
    batched = policy.update_batch(stack_states(states), obs, runner.source)
    for r, state in enumerate(states):
        alone = policy.update(state, obs.request(r), runner.source)
        assert batched.reset_reasons[r] == alone.reset_reason
        assert batched.state.keys() == alone.state.keys()
        for key, tensor in alone.state.items():
            torch.testing.assert_close(batched.state[key][r], tensor, atol=1e-5, rtol=1e-4, msg=f"{name} {key} row {r}")  # fmt: skip
    unchanged = len(SIZES) - 1  # all open-set: its statistics stay exactly as they were
    if name in ("bn", "default", "bn_switching"):
        for key, tensor in states[unchanged].items():
            if key.startswith("bn.") and not key.startswith("bn.diversity"):
                assert torch.equal(batched.state[key][unchanged], tensor), key


def test_collapse_guard_resets_the_same_rows_in_a_batch(random_model):
    runner = ModelRunner(random_model)
    policy = build_policy("default")
    states = _streams(runner, policy, len(SIZES))
    collapsed = dict(states[2]) | {ENTROPY_KEY: torch.zeros(1), UPDATES_KEY: torch.tensor([50.0])}  # fmt: skip
    states[2] = collapsed
    obs = _observation(runner, policy, states, SIZES)
    confident = torch.zeros_like(obs.probs)
    confident[:, 0] = 1.0  # zero entropy: the EMA stays below the floor
    obs = dataclasses.replace(obs, probs=confident)
    batched = policy.update_batch(stack_states(states), obs, runner.source)
    assert batched.reset_reasons == [None, None, "entropy_collapse", None]
    fresh = policy.init_state(runner.source)
    for key, tensor in fresh.items():
        if key.startswith("bn."):
            assert torch.equal(batched.state[key][2], tensor), key
    alone = policy.update(collapsed, obs.request(2), runner.source)
    assert alone.reset_reason == "entropy_collapse"
    for key, tensor in alone.state.items():
        torch.testing.assert_close(batched.state[key][2], tensor)
