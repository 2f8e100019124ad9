"""The shared model's forward with per-stream statistics, compiled whole (opt-in).

In eager PyTorch every stream-norm layer adds ~15-40 small operations (per-sample moments,
mixing with the stream's statistics, normalization), each paying a few microseconds of
dispatch: on the demo ResNet-20 the `bn` policy's forward costs ~1.7x the frozen model's
for one image. `torch.compile` (inductor) fuses them into the convolutions' neighbours.

The model is traced once with `torch.fx`, stream norms kept as leaves, and each stream
norm becomes a call of a `normalize(norm, x) -> (out, means, variances)` function that
the forward receives as an argument. So the statistics need no context variable, and the
graph returns the per-sample moments and the classifier's input with the logits. One
`CompiledForward` per policy closes over the policy (its Python branches are constants)
and takes the stacked state dict and the batch's `Segments` as inputs; dynamo recompiles
when their shapes first vary (`warm_up_sizes` lists the variants) and treats the sizes as
dynamic after that, so `DataPlane.warm_up` compiles every variant before the server is
ready and no request pays for a compilation.

Once warmed up, a compiled forward is *sealed* (`seal`): a batch variant the warm-up did
not compile runs eager (dynamo's "eager_on_recompile" stance; the same values, slower)
instead of stalling the forward thread for the seconds to a minute a compilation takes,
and `eager_runs` counts it.

Inductor on CPU compiles C++ at run time: it needs a C++ compiler (the Docker image has
one when built with WITH_CXX=1). Any failure to trace or compile leaves the eager forward
in place.
"""

from __future__ import annotations

import itertools
import operator
import types
from collections.abc import Callable
from typing import Any

import torch
from torch import fx, nn

from ttaserve.adapters.moments import Segments
from ttaserve.adapters.policy import AdaptationPolicy, StateTensors
from ttaserve.adapters.stream_norm import StreamNorm

# normalize(norm, x) -> (normalized x, per-sample means (N, C) or None, variances or None)
Normalize = Callable[[StreamNorm, torch.Tensor], tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]]  # fmt: skip
# (logits (N, K), classifier input (N, D) or None, per-layer means, per-layer variances)
GraphOutput = tuple[torch.Tensor, torch.Tensor | None, tuple[torch.Tensor | None, ...], tuple[torch.Tensor | None, ...]]  # fmt: skip


def warm_up_sizes(single_thread_below: int, max_images: int) -> list[tuple[int, ...]]:
    """Request sizes of the warm-up batches, which must meet every variant that dynamo
    specializes the forward on, so that no request pays for a compilation: each request
    structure (one request; one-image requests; mixed, with varying request counts and one
    large request among small ones: policies give large requests extra per-forward rows) at
    batch sizes on both sides of every threshold known to split graphs: 1 (dynamo's 0/1
    specialization), 2 then 3 (the second size seen marks a dimension dynamic), powers of
    two (kernels choose paths by size: a CPU convolution's guard at 16 images), and the
    one-thread threshold (`single_thread_below`: dynamo guards on the thread count)."""
    counts = {1, 2, 3, max_images, single_thread_below - 1, single_thread_below, single_thread_below + 1}  # fmt: skip
    for k in range(1, max_images.bit_length()):
        counts |= {2**k, 2**k + 1}
    sizes: list[tuple[int, ...]] = []
    for n in sorted(c for c in counts if 1 <= c <= max_images):
        sizes.append((n,))
        if n >= 2:
            sizes.append((1,) * n)
        if n >= 3:
            sizes.append((2,) + (1,) * (n - 2))
            sizes.append((n - 1, 1))  # a large request beside others (`default`'s switch gate)
    return sizes


RECOMPILE_LIMIT = 64  # variants per compiled forward (`warm_up_sizes` meets ~15-25)
_instances = itertools.count()  # names each compiled forward's code apart


class UnsupportedModelError(RuntimeError):
    """The model's forward cannot be traced into one graph with stream norms as calls."""


class _StreamNormLeafTracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, StreamNorm) or super().is_leaf_module(m, module_qualified_name)


def _call_normalize(normalize: Normalize, norm: StreamNorm, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:  # fmt: skip
    return normalize(norm, x)


def functional_graph(module: nn.Module) -> fx.GraphModule:
    """`module`'s forward as a graph `(x, normalize) -> GraphOutput`, each stream norm a call
    of `normalize` (moments in layer-index order; the classifier input is that of the last
    `nn.Linear`, None without one). Raises `UnsupportedModelError` when it cannot trace."""
    try:
        graph = _StreamNormLeafTracer().trace(module)
    except Exception as exc:  # data-dependent control flow and the like
        raise UnsupportedModelError(f"torch.fx cannot trace the model: {exc}") from exc
    inputs = [n for n in graph.nodes if n.op == "placeholder"]
    if len(inputs) != 1:
        raise UnsupportedModelError(f"the model's forward takes {len(inputs)} inputs, not one")
    with graph.inserting_after(inputs[0]):
        normalize = graph.placeholder("normalize")
    moments: dict[int, tuple[fx.Node, fx.Node]] = {}
    features: fx.Node | None = None
    for node in list(graph.nodes):
        if node.op != "call_module":
            continue
        sub = module.get_submodule(str(node.target))
        if isinstance(sub, nn.Linear):
            features = node.args[0]  # type: ignore[assignment]
        if not isinstance(sub, StreamNorm):
            continue
        with graph.inserting_before(node):
            norm = graph.get_attr(str(node.target))
            call = graph.call_function(_call_normalize, (normalize, norm, node.args[0]))
            out, mean, var = (graph.call_function(operator.getitem, (call, i)) for i in range(3))
        node.replace_all_uses_with(out)
        graph.erase_node(node)
        moments[sub.layer_index] = (mean, var)
    if sorted(moments) != list(range(len(moments))):
        raise UnsupportedModelError("stream norms are not numbered 0..L-1 in the traced graph")
    output = next(n for n in graph.nodes if n.op == "output")
    with graph.inserting_before(output):
        flat = graph.call_method("flatten", (features, 1)) if features is not None else None
    logits = output.args[0]
    graph.erase_node(output)
    ordered = [moments[i] for i in range(len(moments))]
    graph.output((logits, flat, tuple(m for m, _ in ordered), tuple(v for _, v in ordered)))
    graph.lint()
    return fx.GraphModule(module, graph, class_name="AdaptedForward")


class CompiledForward:
    """One policy's forward (`policy=None`: the frozen source model), compiled."""

    def __init__(self, graph: fx.GraphModule, policy: AdaptationPolicy | None, backend: str | Callable[..., Any] = "inductor") -> None:  # fmt: skip
        self.graph = graph
        self.policy = policy
        self.sealed = False  # after warm-up: variants not compiled run eager (see `seal`)
        self.eager_runs = 0  # calls that ran eager since then (not compiled at warm-up)
        # One graph or an error (a policy that breaks the graph runs eager). Each instance
        # compiles its own copy of `_forward`'s code, under a name of its own: dynamo keeps
        # compiled variants per code object and the shape history that marks dimensions
        # dynamic per code name, and shared between policies, one policy's warm-up changed
        # the guards of another's graphs (with `bn` compiled beside it, `default` missed
        # its warmed-up graphs on stored states: a recompilation, or eager once sealed).
        name = f"_forward_{policy.name if policy else 'frozen'}_{next(_instances)}"
        forward = types.MethodType(_own_code(CompiledForward._forward, name), self)
        self._compiled = torch.compile(forward, backend=backend, fullgraph=True, isolate_recompiles=True, recompile_limit=RECOMPILE_LIMIT)  # fmt: skip

    def _forward(self, x: torch.Tensor, state: StateTensors, segments: Segments) -> GraphOutput:
        if not torch.compiler.is_compiling():  # dynamo runs this body only when not compiled
            self.eager_runs += 1
        policy = self.policy
        if policy is None:
            return self.graph(x, _frozen)

        def normalize(norm: StreamNorm, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
            def statistics(layer: int, mean: torch.Tensor, var: torch.Tensor, n: StreamNorm) -> tuple[torch.Tensor, ...]:  # fmt: skip
                return policy.layer_statistics(layer, state, mean, var, segments, n)

            return norm.adapt(h, statistics)

        return self.graph(x, normalize)

    def seal(self) -> None:
        """From now on never compile: a call that no compiled variant fits runs eager."""
        self.sealed, self.eager_runs = True, 0

    def __call__(self, x: torch.Tensor, state: StateTensors, segments: Segments) -> GraphOutput:
        if not self.sealed:
            return self._compiled(x, state, segments)
        with torch.compiler.set_stance("eager_on_recompile"):
            return self._compiled(x, state, segments)


def _own_code(function: types.FunctionType, name: str) -> types.FunctionType:
    """`function` with a code object of its own (named `name`)."""
    code = function.__code__.replace(co_name=name, co_qualname=name)
    return types.FunctionType(code, function.__globals__, name, function.__defaults__, function.__closure__)  # fmt: skip


def _frozen(norm: StreamNorm, x: torch.Tensor) -> tuple[torch.Tensor, None, None]:
    return norm.frozen(x), None, None


def compiled_graph_count() -> int:
    """Graphs dynamo has compiled in this process so far (all backends)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])
