"""Unit tests of the adaptation pieces on small tensors, and of every registered policy."""

import math

import pytest
import torch

from conftest import observation_of
from ttaserve.adapters.collapse_guard import CollapseGuard
from ttaserve.adapters.composed import ComposedPolicy
from ttaserve.adapters.ema_batchnorm import EmaStatistics
from ttaserve.adapters.lame import LameCorrection, lame
from ttaserve.adapters.moments import Segments
from ttaserve.adapters.policy import BatchView, Observation, SourceModel
from ttaserve.adapters.prior_correction import PRIOR_KEY, PriorCorrection, em_prior
from ttaserve.adapters.registry import POLICIES, build_policy
from ttaserve.adapters.reliability_gate import CrowdGate, EnergyOpenSetGate, confidence_dropped
from ttaserve.adapters.unmix_tns import UnmixStatistics
from ttaserve.server.model_runner import ModelRunner
from ttaserve.server.state import StreamState, decode_state, encode_state


def _gaussian_posteriors(prior_t: torch.Tensor, n: int, seed: int = 0):
    """Posteriors of a calibrated 1-D Gaussian classifier trained under a uniform prior."""
    g = torch.Generator().manual_seed(seed)
    k = len(prior_t)
    labels = torch.multinomial(prior_t, n, replacement=True, generator=g)
    centres = torch.arange(k, dtype=torch.float32) * 1.5
    x = centres[labels] + torch.randn(n, generator=g)
    logits = -0.5 * (x.unsqueeze(1) - centres).square()
    return logits, labels


def test_em_recovers_a_known_prior_from_synthetic_posteriors():
    target = torch.tensor([0.6, 0.25, 0.1, 0.05])
    logits, _ = _gaussian_posteriors(target, 20_000)
    uniform = torch.full((4,), 0.25)
    estimate = em_prior(logits.softmax(1), uniform.clone(), uniform, steps=200)
    assert (estimate - target).abs().max() < 0.03
    assert (logits.softmax(1).mean(0) - target).abs().max() > 0.05  # the naive mean is biased


def test_online_prior_correction_converges_and_improves_accuracy():
    target = torch.tensor([0.7, 0.1, 0.1, 0.1])
    uniform = torch.full((4,), 0.25)
    source = SourceModel(layers=[], prior=uniform, num_classes=4)
    piece = PriorCorrection(batch_em=False, rate=0.01)
    state = piece.init_state(source)
    for step in range(40):
        logits, _ = _gaussian_posteriors(target, 64, seed=step)
        n = logits.shape[0]
        obs = Observation([], logits.softmax(1), logits, torch.ones(n, dtype=torch.bool), torch.zeros(n, dtype=torch.bool))  # fmt: skip
        state = piece.update(state, obs, source)
    assert (state[PRIOR_KEY] - target).abs().max() < 0.06
    logits, labels = _gaussian_posteriors(target, 4000, seed=99)
    view = BatchView(logits, None, {PRIOR_KEY: state[PRIOR_KEY].unsqueeze(0)}, Segments.from_sizes([4000]), source)  # fmt: skip
    corrected = piece.correct(view, logits)
    assert (corrected.argmax(1) == labels).float().mean() > (logits.argmax(1) == labels).float().mean() + 0.02  # fmt: skip


def test_confidence_drop_filter_rejects_samples_whose_confidence_fell():
    source = torch.tensor([[0.7, 0.2, 0.1], [0.5, 0.4, 0.1], [0.2, 0.2, 0.6]])
    adapted = torch.tensor([[0.9, 0.05, 0.05], [0.3, 0.6, 0.1], [0.1, 0.1, 0.8]])
    assert confidence_dropped(adapted, source).tolist() == [False, True, False]
    view = BatchView(adapted.log(), None, {}, Segments.from_sizes([3]), SourceModel([], torch.full((3,), 1 / 3), 3), source.log())  # fmt: skip
    assert CrowdGate().gate(view, adapted.log()).accepted.tolist() == [True, False, True]


def test_energy_gate_flags_low_energy_samples_relative_to_the_stream():
    source = SourceModel([], torch.full((3,), 1 / 3), 3, energy_threshold=2.0, energy_mean=3.0, energy_std=0.5)  # fmt: skip
    gate = EnergyOpenSetGate(z_threshold=2.0)
    state = {k: v.unsqueeze(0) for k, v in gate.init_state(source).items()}
    logits = torch.tensor([[3.0, 0.0, 0.0], [0.2, 0.1, 0.0]])  # energies ~3.1 and ~1.2
    result = gate.gate(BatchView(logits, None, state, Segments.from_sizes([2]), source), logits)
    assert result.open_set.tolist() == [False, True]
    assert result.accepted.tolist() == [True, False]
    assert result.open_set_score[1] > result.open_set_score[0]


def test_unmix_with_one_component_and_no_instance_term_equals_ema_mixing(random_model):
    runner = ModelRunner(random_model)
    unmix = ComposedPolicy("u", UnmixStatistics(components=1, instance_term=False, update_from="all"))  # fmt: skip
    ema = ComposedPolicy("e", EmaStatistics(request_prior=math.inf, fixed_momentum=0.1, update_from="all"))  # fmt: skip
    su, se = unmix.init_state(runner.source), ema.init_state(runner.source)
    g = torch.Generator().manual_seed(0)
    for step in range(3):
        x = torch.randn(16, 3, 32, 32, generator=g) * 0.5 + 1.0
        ru = runner.forward(x, Segments.from_sizes([16]), unmix, [su])
        re = runner.forward(x, Segments.from_sizes([16]), ema, [se])
        if step == 0:
            assert torch.equal(ru.logits, re.logits)
        torch.testing.assert_close(ru.logits, re.logits, atol=1e-5, rtol=1e-5)
        su = unmix.update(su, observation_of(ru), runner.source).state
        se = ema.update(se, observation_of(re), runner.source).state
        for layer in range(len(runner.layers)):
            torch.testing.assert_close(su[f"unmix.{layer}.mean"][0], se[f"bn.{layer}.mean"], atol=1e-6, rtol=1e-6)  # fmt: skip
            torch.testing.assert_close(su[f"unmix.{layer}.var"][0], se[f"bn.{layer}.var"], atol=1e-6, rtol=1e-6)  # fmt: skip


def test_unmix_fresh_state_reproduces_the_source_model(random_model):
    runner = ModelRunner(random_model)
    policy = ComposedPolicy("u", UnmixStatistics(instance_term=False))
    x = torch.randn(4, 3, 32, 32)
    ref = runner.forward(x, Segments.from_sizes([4]), build_policy("source"), [{}]).logits
    out = runner.forward(x, Segments.from_sizes([4]), policy, [policy.init_state(runner.source)]).logits  # fmt: skip
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


def test_lame_smooths_a_correlated_batch_and_is_gated_on_iid_ones():
    g = torch.Generator().manual_seed(0)
    features = torch.cat([torch.randn(10, 8, generator=g) + 5, torch.randn(10, 8, generator=g) - 5])
    probs = torch.full((20, 3), 0.1)
    probs[:10, 0], probs[10:, 1] = 0.8, 0.8
    probs[0] = torch.tensor([0.3, 0.4, 0.3])  # a noisy sample inside cluster 0
    y = lame(probs, features, k=5)
    assert y[0].argmax() == 0
    piece = LameCorrection()
    uniform = torch.full((3,), 1 / 3)
    assert piece.correlated(torch.tensor([[0.9, 0.05, 0.05]] * 16), uniform)
    assert not piece.correlated(torch.eye(3).repeat(6, 1) * 0.8 + 0.2 / 3, uniform)


def test_collapse_guard_resets_an_overconfident_stream():
    source = SourceModel([], torch.full((10,), 0.1), 10, mean_entropy=0.5)
    guard = CollapseGuard(warmup_updates=3)
    state = guard.init_state(source)
    confident = torch.full((8, 10), 1e-6)
    confident[:, 0] = 1.0
    obs = Observation([], confident, confident.log(), torch.ones(8, dtype=torch.bool), torch.zeros(8, dtype=torch.bool))  # fmt: skip
    reasons = []
    for _ in range(60):
        state, reason = guard.check(state, obs, source)
        reasons.append(reason)
    assert "entropy_collapse" in reasons
    assert reasons[0] is None


def test_tent_gradients_stay_within_their_stream(random_model):
    runner, policy = ModelRunner(random_model), build_policy("tent")
    fresh = policy.init_state(runner.source)
    x = torch.randn(6, 3, 32, 32)
    result = runner.forward(x, Segments.from_sizes([3, 3]), policy, [fresh, fresh])
    assert result.grads
    alone = runner.forward(x[:3], Segments.from_sizes([3]), policy, [fresh])
    for key, grad in alone.grads.items():
        torch.testing.assert_close(result.grads[key][0], grad[0], atol=1e-5, rtol=1e-4)
    new = policy.update(fresh, observation_of(alone, slice(0, 3)), runner.source).state
    assert any(not torch.equal(new[k], fresh[k]) for k in fresh if k.startswith("affine."))


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_every_policy_round_trips_and_stays_finite_on_black_images(random_model, name):
    runner, policy = ModelRunner(random_model), build_policy(name)
    state = policy.init_state(runner.source)
    for x in (torch.full((4, 3, 32, 32), -2.0), torch.full((1, 3, 32, 32), -2.0), torch.randn(5, 3, 32, 32)):  # fmt: skip
        result = runner.forward(x, Segments.from_sizes([len(x)]), policy, [state])
        assert torch.isfinite(result.logits).all()
        state = policy.update(state, observation_of(result), runner.source).state
        assert all(torch.isfinite(t).all() for t in state.values()), name
    record = StreamState.of(name, policy.params(), "fp", state, version=3, samples_seen=10)
    decoded = decode_state(encode_state(record), "fp")
    assert decoded.header() == record.header()
    assert decoded.tensors.keys() == state.keys()
    assert all(torch.equal(decoded.tensors[k], state[k]) for k in state)
