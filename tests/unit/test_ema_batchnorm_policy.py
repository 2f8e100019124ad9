import pytest
import torch

from conftest import observation_of
from ttaserve.adapters.ema_batchnorm import DIVERSITY_KEY, SENSITIVITY_KEY, EmaStatistics
from ttaserve.adapters.moments import Segments
from ttaserve.adapters.policy import BatchObservation, Observation
from ttaserve.adapters.registry import build_policy
from ttaserve.server.model_runner import ModelRunner, stack_states


def _forward(runner, policy, x, states, sizes):
    return runner.forward(x, Segments.from_sizes(sizes), policy, states)


def _shifted(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g) * 0.4 + 1.5  # a covariate shift


def test_alpha_zero_reproduces_source_exactly_even_after_updates(random_model):
    runner = ModelRunner(random_model)
    source, frozen_bn = build_policy("source"), build_policy("bn", alpha=0.0)
    state = frozen_bn.init_state(runner.source)
    for step in range(3):  # the stream's statistics move, alpha=0 must ignore them
        x = _shifted(8, step)
        result = _forward(runner, frozen_bn, x, [state], [8])
        state = frozen_bn.update(state, observation_of(result, slice(0, 8)), runner.source).state
    x = _shifted(5, 99)
    expected = _forward(runner, source, x, [{}], [5]).logits
    assert torch.equal(_forward(runner, frozen_bn, x, [state], [5]).logits, expected)


def test_requests_batched_together_equal_requests_alone(random_model):
    runner, policy = ModelRunner(random_model), build_policy("bn")
    fresh = policy.init_state(runner.source)
    other = {k: v * 1.1 for k, v in fresh.items()}  # a second stream with other statistics
    a, b = _shifted(3, 1), torch.randn(2, 3, 32, 32)
    together = _forward(runner, policy, torch.cat([a, b]), [fresh, other], [3, 2])
    alone_a = _forward(runner, policy, a, [fresh], [3])
    alone_b = _forward(runner, policy, b, [other], [2])
    torch.testing.assert_close(together.logits[:3], alone_a.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(together.logits[3:], alone_b.logits, atol=1e-5, rtol=1e-5)
    for (m, v), (ma, va) in zip(together.moments, alone_a.moments, strict=True):
        torch.testing.assert_close(m[:3], ma, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(v[:3], va, atol=1e-5, rtol=1e-5)


def test_single_image_stream_moves_statistics_towards_the_target(random_model):
    runner, policy = ModelRunner(random_model), build_policy("bn")
    state = initial = policy.init_state(runner.source)
    target = _shifted(64, 7)
    truth = _forward(runner, build_policy("bn", request_prior=0.0), target, [initial], [64])
    true_mean = truth.moments[0][0].mean(0)  # first layer: its input does not depend on state
    for i in range(40):
        result = _forward(runner, policy, target[i : i + 1], [state], [1])
        state = policy.update(state, observation_of(result, slice(0, 1)), runner.source).state
    before = (initial["bn.0.mean"] - true_mean).norm()
    after = (state["bn.0.mean"] - true_mean).norm()
    assert after < 0.5 * before
    assert all(torch.isfinite(t).all() for t in state.values())


def test_update_is_pure_and_constant_black_images_keep_state_finite(random_model):
    runner, policy = ModelRunner(random_model), build_policy("bn")
    state = policy.init_state(runner.source)
    snapshot = {k: v.clone() for k, v in state.items()}
    black = torch.full((4, 3, 32, 32), -2.0)  # a black image after normalization
    result = _forward(runner, policy, black, [state], [4])
    new = policy.update(state, observation_of(result, slice(0, 4)), runner.source).state
    assert all(torch.equal(state[k], snapshot[k]) for k in state)
    assert all(torch.isfinite(t).all() for t in new.values())
    assert torch.isfinite(_forward(runner, policy, black[:1], [new], [1]).logits).all()


def test_momentum_decays_with_samples_seen_down_to_its_floor():
    stats = EmaStatistics(source_prior=16.0, momentum_floor=1e-3)
    early, late = float(stats.momentum(64, 0)), float(stats.momentum(64, 100_000))
    assert early == pytest.approx(64 / 80)
    assert late == pytest.approx(1 - (1 - 1e-3) ** 64, rel=1e-4)  # float32 powers
    assert float(stats.momentum(1, 10)) > float(stats.momentum(1, 1000))
    assert float(stats.momentum(0, 10)) == 0.0  # a request without samples moves nothing


def test_closed_shift_gate_reproduces_source_exactly(random_model):
    runner, source = ModelRunner(random_model), build_policy("source")
    gated = build_policy("bn", shift_gate=(100.0, 101.0))  # no input moves statistics that far
    state = gated.init_state(runner.source)
    result = _forward(runner, gated, _shifted(8, 0), [state], [8])
    state = gated.update(state, observation_of(result, slice(0, 8)), runner.source).state
    x = _shifted(5, 99)
    expected = _forward(runner, source, x, [{}], [5]).logits
    assert torch.equal(_forward(runner, gated, x, [state], [5]).logits, expected)


def test_open_shift_gate_equals_the_ungated_policy(random_model):
    runner = ModelRunner(random_model)
    plain, gated = build_policy("bn"), build_policy("bn", shift_gate=(0.0, 1e-9))
    state = plain.init_state(runner.source)
    x = _shifted(6, 3)
    torch.testing.assert_close(
        _forward(runner, gated, x, [state], [6]).logits,
        _forward(runner, plain, x, [state], [6]).logits,
        atol=1e-5,
        rtol=1e-5,
    )


def test_shift_gate_is_decided_per_request(random_model):
    """A fractional gate differs between requests; batching them together changes nothing."""
    runner, policy = ModelRunner(random_model), build_policy("bn", shift_gate=(0.0, 50.0))
    fresh = policy.init_state(runner.source)
    a, b = _shifted(3, 1), torch.randn(2, 3, 32, 32) * 0.1  # a strong and a mild shift
    together = _forward(runner, policy, torch.cat([a, b]), [fresh, fresh], [3, 2])
    alone_a = _forward(runner, policy, a, [fresh], [3])
    alone_b = _forward(runner, policy, b, [fresh], [2])
    torch.testing.assert_close(together.logits[:3], alone_a.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(together.logits[3:], alone_b.logits, atol=1e-5, rtol=1e-5)
    ungated = build_policy("bn")
    assert not torch.allclose(alone_a.logits, _forward(runner, ungated, a, [fresh], [3]).logits)


def test_switch_gate_that_never_opens_changes_nothing(random_model):
    runner = ModelRunner(random_model)
    plain, gated = build_policy("bn"), build_policy("bn", switch_gate=(100.0, 101.0))
    state = plain.init_state(runner.source)
    x = _shifted(32, 4)
    a, b = _forward(runner, plain, x, [state], [32]), _forward(runner, gated, x, [state], [32])
    assert torch.equal(a.logits, b.logits)
    obs = observation_of(a, slice(0, 32))
    new_a, new_b = plain.update(state, obs, runner.source).state, gated.update(state, obs, runner.source).state  # fmt: skip
    assert all(torch.equal(new_a[k], new_b[k]) for k in new_a)


def test_domain_switch_forgets_a_long_history_fast(random_model):
    """A long stream (momentum near its floor) meets a batch from another domain: with the
    switch gate open the update moves half way, without it a few percent."""
    runner = ModelRunner(random_model)
    plain, gated = build_policy("bn"), build_policy("bn", switch_gate=(0.0, 1e-6))
    state = plain.init_state(runner.source)
    state["bn.samples"] = torch.tensor([100_000.0])
    x = _shifted(32, 5)
    obs = observation_of(_forward(runner, plain, x, [state], [32]), slice(0, 32))
    pooled = obs.moments[0][0].mean(0)  # layer 0's pooled mean of the batch
    for policy, momentum in (
        (gated, 0.5),
        (plain, float(plain.statistics.momentum(32, 100_000.0))),
    ):
        new = policy.update(state, obs, runner.source).state
        expected = (1 - momentum) * state["bn.0.mean"] + momentum * pooled
        torch.testing.assert_close(new["bn.0.mean"], expected, atol=1e-5, rtol=1e-5)
    small = observation_of(_forward(runner, gated, x[:4], [state], [4]), slice(0, 4))
    assert float(gated.statistics._switch(state, small)) == 0.0  # too few samples to call a switch
    new_small = gated.update(state, small, runner.source).state
    assert torch.equal(new_small["bn.0.mean"], plain.update(state, small, runner.source).state["bn.0.mean"])  # fmt: skip


def test_a_switching_request_can_be_normalized_with_its_own_statistics(random_model):
    """With `switch_request_weight` 1.0 a request taken as a domain switch ignores its
    stream's (other-domain) history, like BN-adapt; a request too small to call a switch,
    and the same request without that weight, do not."""
    runner = ModelRunner(random_model)
    own = build_policy("bn", switch_gate=(0.0, 1e-6), switch_request_weight=1.0)
    history = build_policy("bn", switch_gate=(0.0, 1e-6))
    state = own.init_state(runner.source)
    state = {k: v * 1.5 if k.endswith((".mean", ".var")) else v for k, v in state.items()}
    x = _shifted(32, 7)
    batch_norm = _forward(runner, build_policy("tbn"), x, [{}], [32]).logits
    torch.testing.assert_close(_forward(runner, own, x, [state], [32]).logits, batch_norm, atol=1e-4, rtol=1e-4)  # fmt: skip
    assert not torch.allclose(_forward(runner, history, x, [state], [32]).logits, batch_norm, atol=1e-2)  # fmt: skip
    small = _forward(runner, own, x[:8], [state], [8]).logits
    torch.testing.assert_close(small, _forward(runner, history, x[:8], [state], [8]).logits)
    with pytest.raises(ValueError, match="switch_request_weight"):
        EmaStatistics(switch_request_weight=1.5)


def test_instance_moments_go_only_to_requests_whose_variances_shrank(random_model):
    """With `instance_shrink_gate`, a low-contrast request (its variances shrank below the
    source's) is normalized partly with its images' own moments; a request whose variances
    grew (noise) is normalized exactly as without instance moments."""
    runner = ModelRunner(random_model)
    plain = build_policy("bn")
    gated = build_policy("bn", instance_weight=0.5, instance_gate=(0.0, 1e-6), instance_shrink_gate=(0.1, 0.2))  # fmt: skip
    state = plain.init_state(runner.source)
    g = torch.Generator().manual_seed(8)
    images = torch.randn(8, 3, 32, 32, generator=g)
    images = images * torch.linspace(0.5, 1.5, 8).view(8, 1, 1, 1)  # images of unlike contrast
    low_contrast, noisy = images * 0.1, images * 4.0
    assert torch.equal(_forward(runner, gated, noisy, [state], [8]).logits, _forward(runner, plain, noisy, [state], [8]).logits)  # fmt: skip
    assert not torch.allclose(_forward(runner, gated, low_contrast, [state], [8]).logits, _forward(runner, plain, low_contrast, [state], [8]).logits, atol=1e-3)  # fmt: skip


def test_class_correlated_streams_can_keep_the_source_statistics_in_class_specific_layers(random_model):  # fmt: skip
    """With `class_specific_alpha_correlated` 0, a stream whose requests look
    class-correlated is normalized with the source statistics in its class-specific
    layers, while an i.i.d.-looking stream in the same batch keeps `class_specific_alpha`."""
    source = ModelRunner(random_model).source
    stats = EmaStatistics(class_sensitivity_scale=0.01, class_specific_alpha=0.5, class_specific_alpha_correlated=0.0)  # fmt: skip
    streams = []
    for diversity in (0.1, 1.0):  # correlated, then i.i.d.-looking
        state = stats.init_state(source)
        state = {k: v * 1.5 if k.endswith((".mean", ".var")) else v for k, v in state.items()}
        # every layer class-specific
        state[SENSITIVITY_KEY] = torch.ones_like(state[SENSITIVITY_KEY])
        state[DIVERSITY_KEY] = torch.tensor([diversity])
        streams.append(state)
    segments = Segments.from_sizes([4, 4])
    batched = stack_states(streams)
    batched = batched | stats.prepare(batched, segments)
    norm = source.layers[0]
    g = torch.Generator().manual_seed(9)
    mean, var = torch.randn(8, norm.channels, generator=g), torch.rand(8, norm.channels, generator=g) + 0.5  # fmt: skip
    got = stats.layer_statistics(0, batched, mean, var, segments, norm)
    assert torch.equal(got.mean[:4], norm.running_mean.expand(4, -1))
    assert torch.equal(got.var[:4], norm.running_var.expand(4, -1))
    assert not torch.allclose(got.mean[4:], norm.running_mean.expand(4, -1))


def test_single_image_batches_skip_the_switch_gate_with_the_same_results(random_model):
    """No request reaches switch_min_batch: the gate's evidence is skipped, nothing changes."""
    runner = ModelRunner(random_model)
    plain, gated = build_policy("bn"), build_policy("bn", switch_gate=(0.0, 1e-6))
    states = [plain.init_state(runner.source) for _ in range(3)]
    x = _shifted(3, 6)
    sizes = [1, 1, 1]
    prepared = gated.prepare(stack_states(states), Segments.from_sizes(sizes))
    assert prepared["bn.forward.switch_evidence"].shape[0] == 0
    a, b = _forward(runner, plain, x, states, sizes), _forward(runner, gated, x, states, sizes)
    assert torch.equal(a.logits, b.logits)


def test_diversity_from_labels_sees_a_correlated_request_behind_diffuse_probabilities(random_model):
    """Corruption makes probabilities diffuse: their mean looks i.i.d. although every image
    is predicted as one class. Measured on labels, the request is seen as correlated."""
    runner = ModelRunner(random_model)
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(32, 10, generator=g) * 0.1, 1)
    probs[:, 3] += 0.05  # every image's top class is 3, by a small margin
    probs = probs / probs.sum(1, keepdim=True)
    logits = probs.log()
    false = torch.zeros(32, dtype=torch.bool)
    obs = Observation([], probs, logits, ~false, false)
    diversity = {}
    for from_labels in (False, True):
        stats = EmaStatistics(diversity_from_labels=from_labels)
        state = stats.init_state(runner.source)
        single = stats.update(state, obs, runner.source)["bn.diversity"]
        batch = BatchObservation([], probs, logits, ~false, false, Segments.from_sizes([32]))
        stacked = stack_states([state])
        batched = stats.update_batch(stacked, batch, runner.source)["bn.diversity"]
        torch.testing.assert_close(batched.reshape(-1), single.reshape(-1))  # both paths agree
        diversity[from_labels] = float(single)
    assert diversity[False] > 0.99  # 0.7 * 1 + 0.3 * ~1: the soft mean looks i.i.d.
    assert diversity[True] == pytest.approx(0.7)  # 0.7 * 1 + 0.3 * 0: one predicted class


def test_instance_mixing_normalizes_an_atypical_image_like_itself_in_the_first_layers(random_model):
    """With the gate wide open and full weight, the first `instance_layers` layers normalize
    each sample with its own moments (alpha 1); later layers, and a gate that does not
    open, give exactly what the policy gives without instance mixing."""
    runner = ModelRunner(random_model)
    plain = EmaStatistics()
    stats = EmaStatistics(instance_weight=1.0, instance_layers=1, instance_gate=(0.0, 1e-6))
    closed = EmaStatistics(instance_weight=1.0, instance_layers=1, instance_gate=(50.0, 60.0))
    segments = Segments.from_sizes([3, 1])
    g = torch.Generator().manual_seed(0)
    batched = stack_states([plain.init_state(runner.source)] * 2)
    for layer, norm in enumerate(runner.source.layers[:2]):
        mean = torch.randn(4, norm.channels, generator=g)
        var = torch.rand(4, norm.channels, generator=g) * 3
        want = plain.layer_statistics(layer, batched, mean, var, segments, norm)
        got = stats.layer_statistics(layer, batched, mean, var, segments, norm)
        if layer == 0:
            torch.testing.assert_close(got.mean, mean)
            torch.testing.assert_close(got.var, var)
        else:
            assert torch.equal(got.mean, want.mean) and torch.equal(got.var, want.var)
        shut = closed.layer_statistics(layer, batched, mean, var, segments, norm)
        assert torch.equal(shut.mean, want.mean.expand_as(shut.mean))
        assert torch.equal(shut.var, want.var.expand_as(shut.var))


def test_instance_weight_out_of_range_is_refused():
    with pytest.raises(ValueError, match="instance_weight"):
        EmaStatistics(instance_weight=1.5)
