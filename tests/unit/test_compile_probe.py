"""The compile probe's eager functions compute what the server computes (no compilation
here: it takes ~20 s per shape)."""

import torch

from ttaserve.adapters.moments import Segments
from ttaserve.adapters.registry import build_policy
from ttaserve.bench.compile_probe import bn_policy_normalize, frozen_normalize, resnet_forward
from ttaserve.server.model_runner import ModelRunner


def test_probe_forwards_match_the_frozen_model_and_the_bn_policy(random_model):
    runner, policy = ModelRunner(random_model), build_policy("bn")
    model = random_model.module.eval()
    x = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    state = policy.init_state(runner.source)
    state = {
        k: v * 1.1 if k.endswith((".mean", ".var")) else v for k, v in state.items()
    }  # an adapted stream
    stream = [(state[f"bn.{i}.mean"].unsqueeze(0), state[f"bn.{i}.var"].unsqueeze(0)) for i in range(len(runner.layers))]  # fmt: skip
    with torch.inference_mode():
        torch.testing.assert_close(resnet_forward(model, x, frozen_normalize), model(x))
        served = runner.forward(x, Segments.from_sizes([5]), policy, [state]).raw_logits
        probe = resnet_forward(model, x, bn_policy_normalize(stream))
    torch.testing.assert_close(probe, served, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(probe, model(x), atol=1e-3)  # the stream's statistics do matter
