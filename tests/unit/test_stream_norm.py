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
    torch.testing.assert_close(wrapper(x), bn(x), rtol=1e-5, atol=1e-5)


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
