import dataclasses

import torch

from ttaserve.adapters.class_moments import class_conditional_moments, class_sensitivity
from ttaserve.adapters.ema_batchnorm import EmaStatistics
from ttaserve.adapters.moments import Segments, pooled_moments
from ttaserve.server.model_package import load_package
from ttaserve.server.model_runner import ModelRunner, stack_states
from ttaserve.server.settings import bundled_model_path


def test_class_moments_equal_the_pooled_moments_of_each_class():
    g = torch.Generator().manual_seed(0)
    mean, var = torch.randn(40, 5, generator=g), torch.rand(40, 5, generator=g)
    labels = torch.arange(40) % 3
    class_mean, class_var = class_conditional_moments(mean, var, labels, num_classes=4)
    for c in range(3):
        rows = labels == c
        expected_mean, expected_var = pooled_moments(mean[rows], var[rows])
        torch.testing.assert_close(class_mean[c], expected_mean)
        torch.testing.assert_close(class_var[c], expected_var)
    assert torch.equal(class_mean[3], torch.zeros(5))  # an absent class stays finite


def test_sensitivity_is_zero_when_classes_share_statistics_and_grows_with_their_spread():
    same = torch.ones(4, 3)
    spread = torch.tensor([[0.0], [2.0], [0.0], [2.0]]).expand(4, 3)
    s = class_sensitivity([(same, same), (spread, same)], [torch.ones(3), torch.ones(3)])
    assert s[0] == 0 and torch.isclose(s[1], torch.tensor(1.0))


def _last_layer_class_specific(model):
    """The model's source with class statistics that make only its last layer class-specific."""
    source = ModelRunner(model).source
    spread = [torch.zeros(10, n.channels) for n in source.layers]
    spread[-1] = torch.randn(10, source.layers[-1].channels) * 3
    return dataclasses.replace(source, class_moments=[(m, torch.ones_like(m)) for m in spread])  # fmt: skip


def test_class_specific_layers_give_a_request_less_weight(random_model):
    source = _last_layer_class_specific(random_model)
    layers = source.layers
    stats = EmaStatistics(class_sensitivity_scale=0.01)
    state = {k: v.unsqueeze(0) for k, v in stats.init_state(source).items()}
    n = Segments.from_sizes([64]).sizes
    first, last = (stats._request_weight(state, n, layer) for layer in (0, len(layers) - 1))
    assert torch.isclose(first, torch.tensor(64 / 80))  # unchanged where classes agree
    assert last < 0.1 * first
    plain = EmaStatistics()  # without the option, or without class statistics: as before
    assert torch.isclose(plain._request_weight(state, n, len(layers) - 1), first)


def test_the_demo_package_carries_class_statistics_for_every_layer():
    model = load_package(bundled_model_path())
    assert model.class_moments is not None and len(model.class_moments) == len(model.layers)
    for (mean, var), norm in zip(model.class_moments, model.layers, strict=True):
        assert mean.shape == var.shape == (model.num_classes, norm.channels)
        assert torch.isfinite(mean).all() and (var >= 0).all()


def test_class_specific_layers_keep_their_share_of_the_source_statistics(random_model):
    source = _last_layer_class_specific(random_model)
    layers = source.layers
    segments = Segments.from_sizes([5, 3])
    results = {}
    for share in (1.0, 0.5, 0.0):
        stats = EmaStatistics(class_sensitivity_scale=0.01, class_specific_alpha=share)
        state = stack_states([stats.init_state(source)] * 2)
        state = {k: v * 1.3 if k.endswith(".var") else v for k, v in state.items()}  # adapted
        state |= stats.prepare(state, segments)
        for layer, norm in enumerate(layers):
            mean = torch.randn(8, norm.channels, generator=torch.Generator().manual_seed(layer))
            var = torch.rand(8, norm.channels, generator=torch.Generator().manual_seed(layer))
            results[share, layer] = stats.layer_statistics(layer, state, mean, var, segments, norm)
    last = len(layers) - 1
    for layer in range(last):  # the other layers do not see the option
        assert torch.equal(results[0.0, layer].var, results[1.0, layer].var)
    assert torch.equal(results[0.0, last].mean, layers[-1].running_mean.expand(8, -1))
    assert torch.equal(results[0.0, last].var, layers[-1].running_var.expand(8, -1))
    # half way: the moments of the even mixture of the source and the fully adapted ones
    full, source_mean, source_var = results[1.0, last], layers[-1].running_mean, layers[-1].running_var  # fmt: skip
    half_mean = (source_mean + full.mean) / 2
    half_var = (source_var + full.var) / 2 + (full.mean - source_mean).square() / 4
    torch.testing.assert_close(results[0.5, last].mean, half_mean)
    torch.testing.assert_close(results[0.5, last].var, half_var)
