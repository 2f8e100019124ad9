"""The shortcuts of the EMA statistics and observations give the values, bit for bit, of
the plain per-layer computations they replace."""

import dataclasses

import torch

from ttaserve.adapters.ema_batchnorm import (
    DIVERSITY_KEY,
    SAMPLES_KEY,
    SENSITIVITY_KEY,
    EmaStatistics,
    state_keys,
)
from ttaserve.adapters.moments import Segments, mix_moments, pooled_moments, segment_moments
from ttaserve.adapters.policy import Observation
from ttaserve.adapters.prior_correction import PRIOR_KEY
from ttaserve.adapters.registry import build_policy, default_statistics
from ttaserve.server.model_runner import ModelRunner, stack_states


def _source_with_class_moments(runner):
    g = torch.Generator().manual_seed(3)
    layers = runner.source.layers
    spread = [torch.randn(10, n.channels, generator=g) * (i / len(layers)) for i, n in enumerate(layers)]  # fmt: skip
    return dataclasses.replace(runner.source, class_moments=[(m, torch.ones_like(m)) for m in spread])  # fmt: skip


def _streams(stats, source, count):
    """`count` stream states that differ in history length, diversity and statistics."""
    states = []
    for r in range(count):
        state = stats.init_state(source)
        state[SAMPLES_KEY] = torch.tensor([float(7 * r * r)])
        state[DIVERSITY_KEY] = torch.tensor([0.6 + 0.1 * r])
        state = {k: v * (1 + 0.05 * r) if k.endswith((".mean", ".var")) else v for k, v in state.items()}  # fmt: skip
        states.append(state)
    return states


def _weight_per_layer(stats, state, n, layer):
    """The request weight as it was computed for one layer at a time."""
    history = stats.momentum(n, state[SAMPLES_KEY].flatten())
    if stats.request_prior is None:
        return history
    prior = torch.as_tensor(stats.request_prior)
    if stats.class_sensitivity_scale is not None and SENSITIVITY_KEY in state:
        prior = prior * (1 + state[SENSITIVITY_KEY][..., layer].flatten() / stats.class_sensitivity_scale)  # fmt: skip
    own = n / (n + prior)
    if not stats.adaptive_request_weight:
        return own
    return torch.where(state[DIVERSITY_KEY].flatten() >= stats.diversity_threshold, own, history)


def test_prepared_request_weights_equal_the_weights_of_each_layer(random_model):
    runner = ModelRunner(random_model)
    source = _source_with_class_moments(runner)
    # the gates (alpha, switch), the class-specific layers' alpha and instance moments are tested apart
    ungated = dataclasses.replace(default_statistics(), shift_gate=None, switch_gate=None, class_specific_alpha=1.0, class_specific_alpha_correlated=None, instance_weight=0.0)  # fmt: skip
    pieces = [ungated, EmaStatistics(), EmaStatistics(request_prior=None, fixed_momentum=0.05)]
    for stats in pieces:
        for sizes in ([1], [64], [1] * 5, [3, 1, 16, 2]):
            segments = Segments.from_sizes(sizes)
            batched = stack_states(_streams(stats, source, len(sizes)))
            shared = batched | stats.prepare(batched, segments)
            g = torch.Generator().manual_seed(len(sizes))
            for layer, norm in enumerate(source.layers):
                expected = _weight_per_layer(stats, batched, segments.sizes, layer)
                assert torch.equal(stats._request_weight(batched, segments.sizes, layer), expected)
                mean = torch.randn(sum(sizes), norm.channels, generator=g)
                var = torch.rand(sum(sizes), norm.channels, generator=g)
                mean_key, var_key = state_keys(layer)
                seg_mean, seg_var = segment_moments(mean, var, segments)
                target = mix_moments(batched[mean_key], batched[var_key], seg_mean, seg_var, expected.unsqueeze(1))  # fmt: skip
                mu, sigma2 = mix_moments(norm.running_mean.unsqueeze(0), norm.running_var.unsqueeze(0), *target, stats.alpha)  # fmt: skip
                want = (segments.broadcast(mu), segments.broadcast(sigma2).clamp_min(0.0))
                for state in (shared, batched):  # with the prepared weights, and without
                    got = stats.layer_statistics(layer, state, mean, var, segments, norm)
                    assert torch.equal(got.mean, want[0]) and torch.equal(got.var, want[1])


def test_update_of_all_layers_at_once_equals_a_mix_per_layer(random_model):
    runner = ModelRunner(random_model)
    g = torch.Generator().manual_seed(0)
    for stats in (EmaStatistics(), default_statistics()):
        (state,) = _streams(stats, runner.source, 1)
        state[PRIOR_KEY] = torch.softmax(torch.randn(10, generator=g), 0)  # class-balanced feed
        for n in (1, 5, 64):
            moments = [(torch.randn(n, m.channels, generator=g), torch.rand(n, m.channels, generator=g)) for m in runner.source.layers]  # fmt: skip
            probs = torch.softmax(torch.randn(n, 10, generator=g), 1)
            false = torch.zeros(n, dtype=torch.bool)
            obs = Observation(moments, probs, probs.log(), ~false, false)
            new = stats.update(state, obs, runner.source)
            momentum = stats.momentum(n, state[SAMPLES_KEY])
            weights = stats._balance_weights(state, obs, runner.source) if stats.class_balanced else None  # fmt: skip
            assert list(new) == list(state)
            for layer, (mean, var) in enumerate(moments):
                mean_key, var_key = state_keys(layer)
                pooled = pooled_moments(mean, var, weights)
                want_mean, want_var = mix_moments(
                    state[mean_key], state[var_key], *pooled, momentum
                )
                assert torch.equal(new[mean_key], want_mean)
                assert torch.equal(new[var_key], want_var.clamp_min(0.0))
            state = new


def test_select_keeps_the_same_values_and_reuses_its_selections():
    g = torch.Generator().manual_seed(1)
    moments = [(torch.randn(4, 3, generator=g), torch.rand(4, 3, generator=g))]
    probs = torch.softmax(torch.randn(4, 5, generator=g), 1)
    for open_set in ([False] * 4, [True, False, True, False], [True] * 4):
        unknown, accepted = torch.tensor(open_set), torch.tensor([True, True, False, True])
        obs = Observation(moments, probs, probs.log(), accepted, unknown)
        assert torch.equal(obs.select("accepted").probs, probs[accepted])
        known = obs.select("known")
        keep = ~unknown
        assert torch.equal(known.probs, probs[keep]) and torch.equal(known.open_set, unknown[keep])  # fmt: skip
        assert torch.equal(known.moments[0][0], moments[0][0][keep]) and known.count == int(keep.sum())  # fmt: skip
        assert obs.select("known") is known and obs.select("all") is obs
        assert (known is obs) == bool(keep.all())
        fresh = dataclasses.replace(obs, probs=probs.flip(0))  # a new observation: a new selection
        assert torch.equal(fresh.select("known").probs, probs.flip(0)[keep])


class _Unprepared:
    """A policy without `prepare`: its layers compute the request weights themselves."""

    def __init__(self, policy):
        self._policy = policy

    def __getattr__(self, name):
        if name == "prepare":
            raise AttributeError(name)
        return getattr(self._policy, name)


def test_forward_with_prepared_weights_equals_a_forward_without(random_model):
    runner, default = ModelRunner(random_model), build_policy("default")
    # the gates' per-forward evidence lives only in the prepared values (tested apart)
    ungated = dataclasses.replace(default.statistics, shift_gate=None, switch_gate=None, instance_shrink_gate=None)  # fmt: skip
    policy = dataclasses.replace(default, statistics=ungated)
    plain = _Unprepared(policy)
    states = [policy.init_state(runner.source) for _ in range(3)]
    states[1][SAMPLES_KEY] = torch.tensor([50.0])
    x = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    for sizes in ([1, 1, 1], [4, 1, 1]):
        segments = Segments.from_sizes(sizes)
        a = runner.forward(x[: sum(sizes)], segments, policy, states)
        b = runner.forward(x[: sum(sizes)], Segments.from_sizes(sizes), plain, states)
        assert torch.equal(a.logits, b.logits) and torch.equal(a.probs, b.probs)
