"""Rewrite the batch-norm operations of a `torch.export` program into stream norms.

This is how a user brings an arbitrary PyTorch model: export it (`torch.export.export`),
package it, and every inference-mode batch norm on a 4-D or 5-D activation becomes a
`StreamNorm` submodule that a policy can adapt per stream.
"""

from __future__ import annotations

import operator

import torch
from torch import fx

from ttaserve.adapters.stream_norm import FeatureTap, StreamNorm

_BATCH_NORM_OPS = {
    torch.ops.aten.batch_norm.default: "plain",
    torch.ops.aten._native_batch_norm_legit_no_training.default: "tuple",
}


def _attr(gm: fx.GraphModule, node: fx.Node | None) -> torch.Tensor | None:
    if node is None:
        return None
    if not isinstance(node, fx.Node) or node.op != "get_attr":
        raise ValueError(f"batch norm argument {node} is not a constant of the program")
    value = gm
    for part in str(node.target).split("."):
        value = getattr(value, part)
    return value


def _bn_arguments(node: fx.Node) -> tuple[fx.Node, ...]:
    args = list(node.args)
    if node.target is torch.ops.aten.batch_norm.default:
        x, weight, bias, mean, var, training, _momentum, eps = args[:8]
        if training:
            raise ValueError("export the model in eval mode: a training-mode batch norm was found")
        return x, weight, bias, mean, var, eps
    x, weight, bias, mean, var, _momentum, eps = args[:7]
    return x, weight, bias, mean, var, eps


def _activation_rank(node: fx.Node) -> int | None:
    val = node.meta.get("val")
    return getattr(val, "ndim", None)


def rewrite_batchnorm_nodes(gm: fx.GraphModule) -> list[StreamNorm]:
    """Replace inference batch norms of `gm` (in place) by StreamNorm submodules, in order."""
    layers: list[StreamNorm] = []
    for node in list(gm.graph.nodes):
        kind = _BATCH_NORM_OPS.get(node.target) if node.op == "call_function" else None
        if kind is None:
            continue
        x, weight, bias, mean, var, eps = _bn_arguments(node)
        rank = _activation_rank(x)
        if rank is not None and rank < 3:
            continue  # BatchNorm1d on vectors keeps the source statistics
        layer = StreamNorm(
            len(layers), _attr(gm, weight), _attr(gm, bias), _attr(gm, mean), _attr(gm, var), eps
        )
        name = f"stream_norm_{layer.layer_index}"
        gm.add_submodule(name, layer)
        layers.append(layer)
        with gm.graph.inserting_after(node):
            replacement = gm.graph.call_module(name, (x,))
        if kind == "plain":
            node.replace_all_uses_with(replacement)
        else:
            for user in list(node.users):
                if user.target is not operator.getitem or user.args[1] != 0:
                    raise ValueError("a batch norm's running statistics are used by the program")
                user.replace_all_uses_with(replacement)
                gm.graph.erase_node(user)
        gm.graph.erase_node(node)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return layers


def tap_last_linear_input(gm: fx.GraphModule) -> bool:
    """Route the input of the program's last linear op through a FeatureTap."""
    linears = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is torch.ops.aten.linear.default]  # fmt: skip
    if not linears:
        return False
    last = linears[-1]
    gm.add_submodule("feature_tap", FeatureTap())
    with gm.graph.inserting_before(last):
        tapped = gm.graph.call_module("feature_tap", (last.args[0],))
    last.replace_input_with(last.args[0], tapped)
    gm.recompile()
    return True


def load_exported_program(path: str) -> tuple[torch.nn.Module, list[StreamNorm]]:
    """Load a `.pt2` program and rewrite it; returns the module and its stream norms."""
    program = torch.export.load(path)
    module = program.module()
    if not isinstance(module, fx.GraphModule):
        raise ValueError(f"{path}: the exported program did not unlift to a graph module")
    layers = rewrite_batchnorm_nodes(module)
    tap_last_linear_input(module)
    return module, layers
