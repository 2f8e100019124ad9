import dataclasses

import torch

from ttaserve.adapters.class_moments import class_conditional_moments, class_sensitivity
from ttaserve.adapters.ema_batchnorm import EmaStatistics
from ttaserve.adapters.moments import Segments, pooled_moments
from ttaserve.server.model_package import load_package
from ttaserve.server.model_runner import ModelRunner
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


def test_class_specific_layers_give_a_request_less_weight(random_model):
    runner = ModelRunner(random_model)
    layers = runner.source.layers
    spread = [torch.zeros(10, n.channels) for n in layers]
    spread[-1] = torch.randn(10, layers[-1].channels) * 3  # only the last layer is class-specific
    source = dataclasses.replace(runner.source, class_moments=[(m, torch.ones_like(m)) for m in spread])  # fmt: skip
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
