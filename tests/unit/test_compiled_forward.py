"""The compiled forward (`server/compiled_forward.py`) computes what the eager one does.

Most tests compile with dynamo's "aot_eager" backend: the same whole-graph capture,
functionalization and guards as inductor, without generating C++ (seconds, not minutes).
One test runs inductor itself on one policy."""

import asyncio
import shutil

import pytest
import torch
from prometheus_client import CollectorRegistry
from torch import nn

from ttaserve.adapters.moments import Segments
from ttaserve.adapters.registry import POLICIES, build_policy
from ttaserve.server.batcher import PredictJob
from ttaserve.server.compiled_forward import (
    UnsupportedModelError,
    compiled_graph_count,
    functional_graph,
)
from ttaserve.server.dataplane import DataPlane
from ttaserve.server.metrics import ServerMetrics
from ttaserve.server.model_runner import ForwardResult, ModelRunner
from ttaserve.server.stores.memory import InMemoryStateStore

FORWARD_ONLY = sorted(n for n in POLICIES if not build_policy(n).differentiable)


def _drifted(state: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """A stream state away from the source: shifted means, scaled variances, a history."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, value in state.items():
        if key.endswith(".mean"):
            value = value + 0.2 * torch.randn(value.shape, generator=g)
        elif key.endswith(".var"):
            value = value * (0.7 + 0.6 * torch.rand(value.shape, generator=g))
        elif key == "bn.samples":
            value = value + 40
        out[key] = value
    return out


def _batch(sizes: list[int], seed: int = 0) -> torch.Tensor:
    """Images as requests bring them: decoded to channels-last strides."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(sum(sizes), 3, 32, 32, generator=g).contiguous(memory_format=torch.channels_last)  # fmt: skip


def _assert_same(got: ForwardResult, want: ForwardResult) -> None:
    torch.testing.assert_close(got.raw_logits, want.raw_logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.probs, want.probs, atol=1e-5, rtol=1e-5)
    assert torch.equal(got.gate.accepted, want.gate.accepted)
    assert torch.equal(got.gate.open_set, want.gate.open_set)
    assert len(got.moments) == len(want.moments)
    for (gm, gv), (wm, wv) in zip(got.moments, want.moments, strict=True):
        torch.testing.assert_close(gm, wm, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(gv, wv, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", FORWARD_ONLY)
def test_every_forward_only_policy_compiles_whole_and_equals_eager(random_model, name):
    """Mixed request sizes, streams away from the source: outputs, gates and moments of the
    compiled forward equal the eager forward's (<= 1e-5). `fullgraph=True` makes any graph
    break an error, so this also pins that the policy traces as one graph."""
    policy = build_policy(name)
    eager, compiled = ModelRunner(random_model), ModelRunner(random_model)
    compiled.compile([policy], backend="aot_eager")
    assert compiled.compiled(policy) is not None
    fresh = policy.init_state(eager.source)
    sizes = [2, 1, 3]
    states = [_drifted(fresh, seed) for seed in range(len(sizes))]
    x, segments = _batch(sizes), Segments.from_sizes(sizes)
    with torch.inference_mode():
        _assert_same(compiled.forward(x, segments, policy, states), eager.forward(x, segments, policy, states))  # fmt: skip


def test_gradient_policies_stay_eager(random_model):
    runner = ModelRunner(random_model)
    tent = build_policy("tent")
    assert runner.compile([tent, build_policy("bn")], backend="aot_eager") == ["bn"]
    assert runner.compiled(tent) is None


def test_after_warm_up_no_request_shape_recompiles(random_model):
    """`warm_up` compiles every variant dynamo specializes on, for both thread regimes
    (small batches on one thread): batches of other sizes then run without recompiling
    (dynamo's `error_on_recompile` turns a recompilation into an error) and equal eager."""
    runner, reference = ModelRunner(random_model), ModelRunner(random_model)
    runner.compile([build_policy("bn")], backend="aot_eager")
    threshold = 8  # small batches below 8 images, on one thread: both regimes are compiled
    dataplane = DataPlane(runner, InMemoryStateStore(), ServerMetrics(), "bn", single_thread_below_images=threshold, forward_threads=2)  # fmt: skip
    rows = 24  # the largest forward pass
    policy = dataplane.policy("bn")

    try:
        asyncio.run(dataplane.warm_up("bn", _batch([rows])))
        fresh = policy.init_state(runner.source)
        with torch._dynamo.config.patch(error_on_recompile=True):
            for seed, sizes in enumerate([[1], [5], [1, 1, 1, 1], [4, 2, 1], [12], [1] * 11, [5, 4, 3], [20], [1] * 19, [9, 8, 1, 2, 3]]):  # fmt: skip
                x, segments = _batch(sizes, seed), Segments.from_sizes(sizes)
                states = [_drifted(fresh, seed + r) for r in range(len(sizes))]
                got = dataplane._executor.submit(dataplane._forward, x, segments, policy, states).result()  # fmt: skip
                with torch.inference_mode():
                    _assert_same(got, reference.forward(x, segments, policy, states))
    finally:
        dataplane.close()


def test_a_batch_the_warm_up_did_not_meet_is_compiled_and_counted(random_model):
    """Without a warm-up the first batch compiles while serving: answered, and counted in
    `ttaserve_forward_compilations_total` (a stall operators should see); the same shape
    again compiles nothing."""
    runner = ModelRunner(random_model)
    runner.compile([build_policy("bn")], backend="aot_eager")
    registry = CollectorRegistry()
    dataplane = DataPlane(runner, InMemoryStateStore(), ServerMetrics(registry), "bn")

    def compilations() -> float:
        return registry.get_sample_value("ttaserve_forward_compilations_total") or 0.0

    async def batch(stream: str) -> None:
        job = PredictJob(stream, None, _batch([2]))
        await dataplane.process_batch([job])
        assert len((await job.future).predictions) == 2

    try:
        asyncio.run(batch("a"))
        first = compilations()
        asyncio.run(batch("b"))
        assert first >= 1 and compilations() == first
    finally:
        dataplane.close()


def test_a_sealed_forward_runs_a_variant_it_did_not_compile_eager_and_counts_it(random_model):
    """After the warm-up a compiled forward is sealed: a batch no compiled variant fits
    runs eager (answered at once, the same values, counted in
    `ttaserve_forward_eager_fallbacks_total`), never compiling while serving; a variant
    the warm-up compiled still runs compiled."""
    runner, reference = ModelRunner(random_model), ModelRunner(random_model)
    runner.compile([build_policy("bn")], backend="aot_eager")
    registry = CollectorRegistry()
    dataplane = DataPlane(runner, InMemoryStateStore(), ServerMetrics(registry), "bn")
    policy = dataplane.policy("bn")
    compiled = runner.compiled(policy)
    assert compiled is not None

    def counted(name: str) -> float:
        return registry.get_sample_value(f"ttaserve_forward_{name}_total") or 0.0

    def forward(sizes: list[int]) -> None:
        x, segments = _batch(sizes), Segments.from_sizes(sizes)
        states = [dataplane.fresh_state("bn").packed for _ in sizes]
        got = dataplane._executor.submit(dataplane._forward, x, segments, policy, states).result()  # fmt: skip
        with torch.inference_mode():
            _assert_same(got, reference.forward(x, segments, policy, states))

    async def batch(stream: str, size: int) -> None:
        job = PredictJob(stream, None, _batch([size]))
        await dataplane.process_batch([job])
        assert len((await job.future).predictions) == size

    try:
        compiled.seal()  # sealed before anything was compiled: nothing fits
        asyncio.run(batch("a", 2))
        assert counted("eager_fallbacks") == 1 and counted("compilations") == 0
        forward([3, 1])
        assert compiled.eager_runs == 2
        compiled.sealed = False  # a warm-up, as `DataPlane.warm_up` runs it
        asyncio.run(dataplane.warm_up("bn", _batch([4])))
        assert compiled.sealed and compiled.eager_runs == 0
        graphs = compiled_graph_count()
        asyncio.run(batch("b", 4))  # a variant the warm-up compiled
        asyncio.run(batch("c", 1))
        assert counted("eager_fallbacks") == 1 and compiled.eager_runs == 0
        forward([40, 1, 1])  # larger than any warm-up batch and a new structure
        assert compiled_graph_count() == graphs and counted("compilations") == 0
    finally:
        dataplane.close()


def test_policies_compiled_side_by_side_keep_their_warmed_up_graphs(random_model):
    """Two policies compiled in one server, warmed up one after the other: requests on
    stored streams (states read back from the store) run the graphs their warm-up
    compiled, neither compiling nor falling back to eager. (Their forwards once shared one
    code object, and `bn`'s warm-up changed the guards of `default`'s graphs.)"""
    runner = ModelRunner(random_model)
    runner.compile([build_policy("bn"), build_policy("default")], backend="aot_eager")
    registry = CollectorRegistry()
    dataplane = DataPlane(runner, InMemoryStateStore(), ServerMetrics(registry), "default")

    async def serve() -> None:
        for name in ("source", "bn", "default"):
            await dataplane.warm_up(name, _batch([4]))
        for round_ in range(3):  # fresh streams, then stored states
            for size in (1, 3):
                jobs = [PredictJob(f"{policy}-{size}", policy, _batch([size], round_)) for policy in ("bn", "default")]  # fmt: skip
                await dataplane.process_batch(jobs)
                for job in jobs:
                    assert (await job.future).samples_seen == (round_ + 1) * size

    try:
        asyncio.run(serve())
        assert (registry.get_sample_value("ttaserve_forward_eager_fallbacks_total") or 0) == 0
        assert (registry.get_sample_value("ttaserve_forward_compilations_total") or 0) == 0
    finally:
        dataplane.close()


def test_a_forward_that_fails_to_compile_runs_eager(random_model):
    """A backend that fails (inductor without a C++ compiler, say) leaves the policy eager
    after the warm-up, and requests are answered."""

    def broken_backend(gm, example_inputs):
        raise RuntimeError("no C++ compiler")

    runner = ModelRunner(random_model)
    runner.compile([build_policy("bn")], backend=broken_backend)
    dataplane = DataPlane(runner, InMemoryStateStore(), ServerMetrics(), "bn")

    async def main() -> None:
        await dataplane.warm_up("bn", _batch([6]))
        job = PredictJob("s", None, _batch([2]))
        await dataplane.process_batch([job])
        assert len((await job.future).predictions) == 2

    try:
        asyncio.run(main())
    finally:
        dataplane.close()
    assert runner.compiled(dataplane.policy("bn")) is None


def test_a_model_with_data_dependent_control_flow_is_not_compiled():
    class Branchy(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x if x.sum() > 0 else -x

    with pytest.raises(UnsupportedModelError):
        functional_graph(Branchy())


def _inductor_toolchain_error() -> str | None:
    """Why inductor cannot compile here (no C++ compiler, no Python headers), or None."""
    if shutil.which("c++") is None and shutil.which("g++") is None:
        return "no C++ compiler"
    try:
        torch.compile(lambda t: t * 2 + 1)(torch.ones(3))
    except Exception as exc:  # the toolchain, not ttaserve: nothing of ours is compiled
        return f"inductor cannot compile here: {str(exc).splitlines()[0]}"
    return None


def test_inductor_compiled_forward_equals_eager(random_model):
    """What the server runs with TTASERVE_COMPILE_POLICIES: inductor's C++ kernels."""
    reason = _inductor_toolchain_error()
    if reason is not None:
        pytest.skip(reason)
    policy = build_policy("bn")
    eager, compiled = ModelRunner(random_model), ModelRunner(random_model)
    compiled.compile([policy])
    fresh = policy.init_state(eager.source)
    sizes = [2, 1]
    states = [_drifted(fresh, seed) for seed in range(len(sizes))]
    x, segments = _batch(sizes), Segments.from_sizes(sizes)
    with torch.inference_mode():
        _assert_same(compiled.forward(x, segments, policy, states), eager.forward(x, segments, policy, states))  # fmt: skip
