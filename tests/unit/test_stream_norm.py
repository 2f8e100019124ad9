import copy

import torch
from safetensors.torch import load_file
from torch import nn

from ttaserve.adapters.moments import Segments
from ttaserve.adapters.policy import SourceModel
from ttaserve.adapters.registry import build_policy
from ttaserve.adapters.stream_norm import NormContext, active_context, convert_batchnorm_modules
from ttaserve.architectures import build_architecture
from ttaserve.server.graph_rewrite import load_exported_program
from ttaserve.server.model_runner import ModelRunner


def test_stream_norm_without_context_equals_batchnorm_in_eval():
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(4).eval()
    bn.running_mean.normal_()
    bn.running_var.uniform_(0.5, 2)
    bn.weight.data.normal_()
    wrapper = nn.Sequential(copy.deepcopy(bn))
    layers = convert_batchnorm_modules(wrapper)
    x = torch.randn(3, 4, 6, 6)
    assert len(layers) == 1
    torch.testing.assert_close(wrapper(x), bn(x), rtol=0, atol=0)  # the same native kernel
    with active_context(NormContext(statistics=None)) as ctx:  # frozen, features still tapped
        torch.testing.assert_close(wrapper(x), bn(x), rtol=0, atol=0)
    assert ctx.moments == {}


def _affine_reference(x, mu, var, weight, bias, eps):
    """x_i * a_i + b_i with a = w / sqrt(var + eps), b = bias - a * mu, per sample (N, C)."""
    scale = weight * (var + eps).rsqrt()
    return x * scale[..., None, None] + (bias - scale * mu)[..., None, None]


def test_per_sample_statistics_normalize_each_sample_on_both_paths():
    """Per-sample (N, C) and shared (1, C) statistics, per-sample affine, and the autograd
    path (no fused kernel): each sample is normalized with its own row."""
    torch.manual_seed(0)
    seq = nn.Sequential(nn.BatchNorm2d(3).eval())
    (layer,) = convert_batchnorm_modules(seq)
    x = torch.randn(4, 3, 5, 5) * 2 + 1
    mu, var = torch.randn(4, 3), torch.rand(4, 3) + 0.1
    weight, bias = torch.randn(4, 3), torch.randn(4, 3)
    cases = [
        (mu, var, None, None),
        (mu[:1], var[:1], None, None),  # shared by all samples
        (mu, var, weight, bias),
    ]
    for m, v, w, b in cases:

        def stats(_i, _mean, _var, _norm, m=m, v=v, w=w, b=b):
            return (m, v) if w is None else (m, v, w, b)

        expected = _affine_reference(x, m, v, layer.weight if w is None else w, layer.bias if b is None else b, layer.eps)  # fmt: skip
        with torch.inference_mode(), active_context(NormContext(statistics=stats)):
            fused = seq(x)
        torch.testing.assert_close(fused, expected, rtol=1e-5, atol=1e-5)
        # a sample's output depends on its own row only: change another sample's row
        if m.shape[0] > 1:
            m2 = m.clone()
            m2[1] += 5

            def moved(_i, _mean, _var, _norm, m2=m2, v=v, w=w, b=b):
                return (m2, v) if w is None else (m2, v, w, b)

            with torch.inference_mode(), active_context(NormContext(statistics=moved)):
                other = seq(x)
            torch.testing.assert_close(other[0], fused[0], rtol=0, atol=0)
            assert not torch.allclose(other[1], fused[1])
    # gradients flow into per-sample statistics and affine through the autograd path
    w = weight.clone().requires_grad_(True)
    m = mu.clone().requires_grad_(True)
    with active_context(NormContext(statistics=lambda _i, _a, _b, _n: (m, var, w, bias))):
        out = seq(x)
    torch.testing.assert_close(out, _affine_reference(x, mu, var, weight, bias, layer.eps), rtol=1e-5, atol=1e-5)  # fmt: skip
    out.square().sum().backward()
    assert w.grad is not None and m.grad is not None and bool(m.grad.abs().sum() > 0)


def test_source_policy_runs_the_frozen_model_without_moments(random_model):
    """`source` is the frozen model: no per-sample moments, outputs of the plain module."""
    runner = ModelRunner(random_model)
    x = torch.randn(3, 3, 32, 32)
    segments = Segments.from_sizes([2, 1])
    policy = build_policy("source")
    assert not policy.normalizes_per_sample and build_policy("default").normalizes_per_sample
    result = runner.forward(x, segments, policy, [policy.init_state(runner.source)] * 2)
    assert result.moments == []
    with torch.inference_mode():
        torch.testing.assert_close(result.raw_logits, random_model.module(x), rtol=0, atol=0)


def test_context_receives_per_sample_moments_and_controls_statistics():
    bn = nn.Sequential(nn.BatchNorm2d(2).eval())
    (layer,) = convert_batchnorm_modules(bn)
    x = torch.randn(2, 2, 4, 4)

    def own_statistics(index, mean, var, norm):
        return mean, var  # instance normalization

    with active_context(NormContext(statistics=own_statistics)) as ctx:
        y = bn(x)
    assert set(ctx.moments) == {0}
    torch.testing.assert_close(y.mean((2, 3)), torch.zeros(2, 2), atol=1e-5, rtol=0)


def test_exported_program_rewrite_matches_module(tmp_path, random_model):
    package = random_model
    reference = build_architecture("cifar_resnet20", 10)
    reference.load_state_dict(load_file(random_model.directory / "weights.safetensors"))
    reference.eval()
    batch = torch.export.Dim("batch", min=1, max=256)
    program = torch.export.export(reference, (torch.randn(2, 3, 32, 32),), dynamic_shapes={"x": {0: batch}})  # fmt: skip
    torch.export.save(program, tmp_path / "m.pt2")
    module, layers = load_exported_program(str(tmp_path / "m.pt2"))
    assert len(layers) == len(package.layers) == 21
    x = torch.randn(5, 3, 32, 32)
    torch.testing.assert_close(module(x), reference(x), rtol=1e-4, atol=1e-4)
    # the rewritten graph adapts like the module does: same policy, same outputs
    policy = build_policy("bn")
    source = SourceModel(layers=layers, prior=torch.full((10,), 0.1), num_classes=10)
    state = policy.init_state(source)
    stacked = {k: v.unsqueeze(0) for k, v in state.items()}
    segments = Segments.from_sizes([5])

    def stats(i, m, v, norm):
        return policy.layer_statistics(i, stacked, m, v, segments, norm)

    with active_context(NormContext(statistics=stats)):
        adapted_graph = module(x)
        adapted_module = package.module(x)
    torch.testing.assert_close(adapted_graph, adapted_module, rtol=1e-4, atol=1e-4)


def test_channels_last_input_adapts_like_contiguous(random_model):
    """Decoded images arrive channels-last: moments and per-sample normalization take them
    as they are and give what a contiguous batch gives."""
    runner = ModelRunner(random_model)
    x = torch.randn(6, 3, 32, 32)
    channels_last = x.contiguous(memory_format=torch.channels_last)
    segments = Segments.from_sizes([4, 2])  # two requests: per-sample statistics
    policy = build_policy("bn")
    states = [policy.init_state(runner.source)] * 2
    a = runner.forward(x, segments, policy, states)
    b = runner.forward(channels_last, segments, policy, states)
    torch.testing.assert_close(b.raw_logits, a.raw_logits, rtol=1e-5, atol=1e-5)
    for (ma, va), (mb, vb) in zip(a.moments, b.moments, strict=True):
        torch.testing.assert_close(mb, ma, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(vb, va, rtol=1e-5, atol=1e-6)
