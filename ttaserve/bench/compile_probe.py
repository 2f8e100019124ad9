"""Feasibility probe: does whole-forward compilation remove the cost of per-stream statistics?

By default the server runs the adapted forward in eager PyTorch, where each stream-norm layer adds
~15-40 small operations (per-sample moments, mixing, normalization) at a few microseconds of
dispatch each: `bn` runs at 0.6-0.7x the frozen model's throughput in process. This probe
writes the `bn` policy's computation for one request as a plain function of the model's
modules (the CIFAR ResNets of `ttaserve.architectures` only), compiles it whole with
`torch.compile` (inductor: needs a C++ compiler at run time) and times it side by side with
the frozen model, eager and compiled:

    python -m ttaserve.bench.compile_probe --threads 1 --images 1,32

It is not the serving path (that is `server/compiled_forward.py`, opt-in with
TTASERVE_COMPILE_POLICIES, which traces the model and compiles each policy's own code).
`tests/unit/test_compile_probe.py` pins that its eager functions compute what the server
computes (the frozen model; the `bn` policy on a fresh stream).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
from torch import nn

from ttaserve.adapters.stream_norm import StreamNorm
from ttaserve.server.model_package import load_package
from ttaserve.server.settings import bundled_model_path

Normalize = Callable[[torch.Tensor, StreamNorm], torch.Tensor]
StreamStatistics = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: (1, C) mean, variance


def resnet_forward(model: nn.Module, x: torch.Tensor, normalize: Normalize) -> torch.Tensor:
    """The forward of a converted `CifarResNet` with every stream norm replaced by `normalize`."""
    out = torch.relu(normalize(model.conv1(x), model.bn1))
    for block in model.layers:
        y = torch.relu(normalize(block.conv1(out), block.bn1))
        y = normalize(block.conv2(y), block.bn2)
        if isinstance(block.shortcut, nn.Identity):
            shortcut = out
        else:
            shortcut = normalize(block.shortcut[0](out), block.shortcut[1])
        out = torch.relu(y + shortcut)
    out = torch.flatten(nn.functional.adaptive_avg_pool2d(out, 1), 1)
    return model.fc(out)


def frozen_normalize(x: torch.Tensor, norm: StreamNorm) -> torch.Tensor:
    """The source model's batch norm (what a stream norm does without statistics)."""
    return torch.batch_norm(x, norm.weight, norm.bias, norm.running_mean, norm.running_var, False, 0.0, norm.eps, False)  # fmt: skip


def bn_policy_normalize(stream: StreamStatistics, request_prior: float = 16.0) -> Normalize:
    """The `bn` policy for one request of n images: the request's pooled moments weigh
    n / (n + request_prior) against the stream's statistics (moments of the mixture), and
    every image is normalized with the result (alpha 1)."""

    def normalize(x: torch.Tensor, norm: StreamNorm) -> torch.Tensor:
        mean = x.mean((2, 3))  # (N, C) per-sample moments
        var = (x - mean[:, :, None, None]).square().mean((2, 3))
        pooled_mean = mean.mean(0, keepdim=True)
        pooled_var = (var + (mean - pooled_mean).square()).mean(0, keepdim=True)
        w = x.shape[0] / (x.shape[0] + request_prior)
        stream_mean, stream_var = stream[norm.layer_index]
        target_mean = torch.lerp(stream_mean, pooled_mean, w)
        target_var = torch.lerp(stream_var, pooled_var, w) + w * (1 - w) * (stream_mean - pooled_mean).square()  # fmt: skip
        scale = norm.weight * torch.rsqrt(target_var + norm.eps)
        shift = norm.bias - scale * target_mean
        return x * scale[:, :, None, None] + shift[:, :, None, None]

    return normalize


def _best_ms(fn: Callable[[], object], calls: int, rounds: int = 7) -> float:
    best = float("inf")
    for _ in range(rounds):
        started = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - started) / calls)
    return best * 1e3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(bundled_model_path()))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--images", default="1,32", help="comma list of batch sizes")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    loaded = load_package(args.model)
    model = loaded.module.eval()
    stream = [(n.running_mean.unsqueeze(0) * 1.01, n.running_var.unsqueeze(0) * 1.02) for n in loaded.layers]  # fmt: skip

    def frozen(x: torch.Tensor) -> torch.Tensor:
        return resnet_forward(model, x, frozen_normalize)

    def adapted(x: torch.Tensor) -> torch.Tensor:
        return resnet_forward(model, x, bn_policy_normalize(stream))

    compiled_frozen = torch.compile(frozen, dynamic=False)
    compiled_adapted = torch.compile(adapted, dynamic=False)
    print(f"{args.threads} intra-op thread(s); ms per forward pass (best of 7 rounds)")
    print("| images | eager frozen module | compiled frozen | eager bn | compiled bn | compiled bn vs eager frozen | compiled bn vs compiled frozen | eager bn vs eager frozen |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for n in (int(v) for v in args.images.split(",")):
        x = torch.randn(n, 3, 32, 32).contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            compiled_frozen(x), compiled_adapted(x)  # compile outside the timing
            torch.testing.assert_close(compiled_adapted(x), adapted(x), atol=1e-3, rtol=1e-3)
            calls = max(5, 200 // n)
            ms = [
                _best_ms(lambda: model(x), calls),  # noqa: B023 (timed within the iteration)
                _best_ms(lambda: compiled_frozen(x), calls),  # noqa: B023
                _best_ms(lambda: adapted(x), calls),  # noqa: B023
                _best_ms(lambda: compiled_adapted(x), calls),  # noqa: B023
            ]
        ratios = (ms[0] / ms[3], ms[1] / ms[3], ms[0] / ms[2])
        print(f"| {n} | " + " | ".join(f"{v:.2f}" for v in ms) + " | " + " | ".join(f"{r:.2f}x" for r in ratios) + " |")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
