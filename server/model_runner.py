"""Runs one forward pass of the shared model for a batch of requests of many streams.

Each request is a segment of the batch; its stream's state tensors are stacked per
request so that the policy can gather per-sample normalization statistics. Gradient
policies get the gradients of their loss w.r.t. their (stacked) state tensors; the model's
own weights never change.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ttaserve.adapters.moments import Segments
from ttaserve.adapters.policy import (
    AdaptationPolicy,
    BatchView,
    GateResult,
    Normalization,
    SourceModel,
    StateTensors,
)
from ttaserve.adapters.stream_norm import NormContext, StreamNorm, active_context
from ttaserve.server.compiled_forward import CompiledForward, functional_graph
from ttaserve.server.model_package import LoadedModel
from ttaserve.server.state import PackedTensors


@dataclass(frozen=True)
class ForwardResult:
    """Outputs of one forward pass over a batch of segments (all detached)."""

    raw_logits: torch.Tensor  # (N, K) model outputs
    logits: torch.Tensor  # (N, K) after the policy's output correction
    probs: torch.Tensor  # (N, K)
    gate: GateResult
    moments: list[tuple[torch.Tensor, torch.Tensor]]  # per layer: (N, C) means, variances
    grads: dict[str, torch.Tensor] = field(default_factory=dict)  # per request (R, ...)
    states: StateTensors = field(default_factory=dict)  # the stacked states it normalized with


@contextlib.contextmanager
def intra_op_threads(count: int | None) -> Iterator[None]:
    """Run the block with `count` intra-op threads (None: as configured), then restore."""
    previous = torch.get_num_threads()
    if count is None or count == previous:
        yield
        return
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def stack_states(states: Sequence[StateTensors | PackedTensors]) -> StateTensors:
    """Stack per-request states into one dict of (R, ...) tensors; packed states of one
    layout stack as one (R, D) tensor, split once."""
    if states and all(isinstance(s, PackedTensors) for s in states):
        packed: list[PackedTensors] = list(states)  # type: ignore[arg-type]
        layout = packed[0].layout
        if all(p.layout == layout for p in packed):
            flat = packed[0].flat.unsqueeze(0) if len(packed) == 1 else torch.stack([p.flat for p in packed])  # fmt: skip
            return layout.split(flat)
    states = [s.tensors if isinstance(s, PackedTensors) else s for s in states]
    if not states or not states[0]:
        return {}
    if len(states) == 1:  # the same values as a stack of one, as views
        return {key: t.unsqueeze(0) for key, t in states[0].items()}
    return {key: torch.stack([s[key] for s in states]) for key in states[0]}


FROZEN = "<frozen>"  # the compiled forward of the source model


class ModelRunner:
    """The shared model with stream norms; stateless between calls."""

    def __init__(self, model: LoadedModel) -> None:
        self.model = model
        # compiled forwards by policy name (FROZEN: the source model), after `compile`
        self._compiled: dict[str, CompiledForward] = {}
        card = model.card
        calibration = card.calibration
        self.source = SourceModel(
            layers=model.layers,
            prior=torch.tensor(card.source_prior, dtype=torch.float32),
            num_classes=len(card.class_names),
            energy_threshold=calibration.energy_threshold if calibration else None,
            energy_mean=calibration.energy_mean if calibration else None,
            energy_std=calibration.energy_std if calibration else None,
            mean_entropy=calibration.mean_entropy if calibration else None,
            confusion=model.confusion,
            temperature=calibration.temperature if calibration else 1.0,
            class_moments=model.class_moments,
            label_adapter=model.label_adapter,
        )

    @property
    def layers(self) -> list[StreamNorm]:
        return self.model.layers

    def compile(self, policies: Sequence[AdaptationPolicy], backend: str | Callable[..., Any] = "inductor") -> list[str]:  # fmt: skip
        """Use compiled forwards for `policies` from now on (`server/compiled_forward.py`);
        the frozen source model is compiled with them (policies without per-sample
        statistics, and gates that compare with it, run that). Gradient policies stay eager.
        Returns the names compiled; the compilation itself happens at each forward's first
        calls with new shapes (`DataPlane.warm_up` drives them). `backend` is torch.compile's
        (tests trace with "aot_eager", which needs no C++ compiler). Raises
        `UnsupportedModelError` for a model that cannot be traced."""
        graph = functional_graph(self.model.module)
        compiling = [p for p in policies if p.normalizes_per_sample and not p.differentiable]
        self._compiled[FROZEN] = CompiledForward(graph, None, backend)
        for policy in compiling:
            self._compiled[policy.name] = CompiledForward(graph, policy, backend)
        return [policy.name for policy in compiling]

    def drop_compiled(self, policy: AdaptationPolicy) -> None:
        """Run `policy` eager again (its compiled forward failed); the frozen model too,
        when that is the one it ran."""
        self._compiled.pop(_compiled_key(policy), None)

    def eager_fallbacks(self) -> int:
        """Calls of sealed compiled forwards that ran eager (no compiled variant fitted)."""
        return sum(c.eager_runs for c in self._compiled.values() if c.sealed)

    def compiled(self, policy: AdaptationPolicy) -> CompiledForward | None:
        """The compiled forward that `policy` runs (None: eager)."""
        if policy.differentiable:
            return None
        return self._compiled.get(_compiled_key(policy))

    def forward(
        self,
        x: torch.Tensor,
        segments: Segments,
        policy: AdaptationPolicy,
        states: Sequence[StateTensors | PackedTensors],
    ) -> ForwardResult:
        """Normalize each segment with its stream's state under `policy`; no state changes."""
        batched = stack_states(states)
        prefixes = tuple(policy.differentiable)
        trainable = [k for k in batched if prefixes and k.startswith(prefixes)]
        for key in trainable:
            batched[key] = batched[key].detach().requires_grad_(True)

        def mode() -> contextlib.AbstractContextManager[None]:
            return torch.enable_grad() if trainable else torch.inference_mode()

        prepare = getattr(policy, "prepare", None)
        with mode():  # per-forward values all layers share: not stream state, never in `batched`
            prepared = prepare(batched, segments) if prepare is not None else None
        layer_state = (batched | prepared) if prepared else batched

        def statistics(layer: int, mean: torch.Tensor, var: torch.Tensor, norm: StreamNorm) -> Normalization:  # fmt: skip
            return policy.layer_statistics(layer, layer_state, mean, var, segments, norm)

        per_sample = policy.normalizes_per_sample
        ctx = NormContext(statistics=statistics if per_sample else None)
        compiled = self.compiled(policy)
        if compiled is not None:
            with torch.inference_mode():
                raw, ctx.features, means, variances = compiled(x, layer_state, segments)
            ctx.moments = dict(enumerate(zip(means, variances, strict=True))) if per_sample else {}  # fmt: skip
        else:
            with mode(), active_context(ctx):
                raw = self.model.module(x)
        source_logits = None
        if policy.needs_source_logits:
            frozen = self._compiled.get(FROZEN)
            with torch.inference_mode():  # the frozen source model
                source_logits = frozen(x, {}, segments)[0] if frozen else self.model.module(x)
        moments = [ctx.moments[i] for i in range(len(self.layers))] if per_sample else []
        if trainable:
            moments = [(mean.detach(), var.detach()) for mean, var in moments]
        view = BatchView(raw.detach(), _detached(ctx.features), batched, segments, self.source, source_logits, moments)  # fmt: skip
        with torch.no_grad():
            logits = policy.correct(view)
            gate = policy.gate(view, logits)
        grads: dict[str, torch.Tensor] = {}
        if trainable:
            loss = policy.loss(BatchView(raw, view.features, batched, segments, self.source), logits, gate)  # fmt: skip
            if loss is not None and loss.requires_grad:
                found = torch.autograd.grad(loss, [batched[k] for k in trainable], allow_unused=True)  # fmt: skip
                grads = {k: (g if g is not None else torch.zeros_like(batched[k])).detach() for k, g in zip(trainable, found, strict=True)}  # fmt: skip
        return ForwardResult(
            raw_logits=view.logits,
            logits=logits,
            probs=logits.softmax(1),
            gate=gate,
            moments=moments,  # type: ignore[arg-type]
            grads=grads,
            states={k: v.detach() for k, v in batched.items()} if trainable else batched,
        )


def _compiled_key(policy: AdaptationPolicy) -> str:
    """The compiled forward a policy runs: its own, or the frozen model's."""
    return policy.name if policy.normalizes_per_sample else FROZEN


def _detached(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach()
