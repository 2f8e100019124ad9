"""Per-stream EMA batch-norm statistics, mixed with each request's own statistics.

Sample i of request r (n_r samples) is normalized with

    target = mix(stream, request_r, w_r)      used = mix(source, target, alpha)

where `mix` takes the moments of the mixture distribution (so one image's instance
statistics are a valid, small contribution: no variance of one sample is computed) and

    w_r = n_r / (n_r + request_prior)          (policy `bn`), or
    w_r = the momentum of the stream update     (request_prior=None: the request counts
                                                 exactly like one more chunk of history)

With alpha = 0 the layer reproduces the source model exactly. After the request the
stream statistics move to the accepted samples' pooled statistics with momentum
max(n / (n_seen + n + source_prior), 1 - (1 - momentum_floor)^n): a cumulative average
at first, then an EMA that keeps tracking drift. This is alpha-BN (You et al. 2021) with
a per-stream memory in place of its stateless batch; with `fixed_momentum` it is RoTTA's
robust BN (Yuan et al. 2023: momentum 0.05 per batch of 64, normalize after updating).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from ttaserve.adapters.class_moments import class_sensitivity
from ttaserve.adapters.moments import (
    Segments,
    mix_moments,
    pooled_moments,
    segment_moments,
    weighted_segment_moments,
)
from ttaserve.adapters.policy import (
    BatchObservation,
    Normalization,
    Observation,
    SourceModel,
    StateTensors,
    source_mixed_normalization,
)
from ttaserve.adapters.prior_correction import PRIOR_KEY
from ttaserve.adapters.stream_norm import StreamNorm

SAMPLES_KEY = "bn.samples"
DIVERSITY_KEY = "bn.diversity"  # EMA of requests' prediction diversity (1 = i.i.d.-like)
SENSITIVITY_KEY = "bn.class_sensitivity"  # (L,) per model, kept in the state to stay pure
# Not stream state: the request weights (R, 1) or (R, L) that `prepare` computes once per
# forward pass for all layers (ModelRunner passes them to `layer_statistics`, never stores them).
REQUEST_WEIGHTS_KEY = "bn.forward.request_weights"
# Per forward, (R, 1): each request's running sum of shift distances over the layers seen so
# far (the covariate-shift gate's accumulator; never stored).
SHIFT_EVIDENCE_KEY = "bn.forward.shift_evidence"
# Per forward, (R, 1): the same for the distance of each request from its stream (switch).
SWITCH_EVIDENCE_KEY = "bn.forward.switch_evidence"
# Per forward, (R, 1): each request's running sum of variance shrink over the instance layers.
SHRINK_EVIDENCE_KEY = "bn.forward.shrink_evidence"
# Per forward, a Python tuple (not a tensor): per layer, whether it is class-specific and
# how many layers up to it are not (the gates' divisor), read once per forward from the
# state, so that layers branch on constants (a compiled forward cannot read tensors).
LAYER_PLAN_KEY = "bn.forward.layer_plan"
LayerPlan = tuple[tuple[bool, int], ...]


@functools.cache
def state_keys(layer: int) -> tuple[str, str]:
    """Names of a layer's stream mean and variance in the state record."""
    return f"bn.{layer}.mean", f"bn.{layer}.var"


@dataclass(frozen=True)
class EmaStatistics:
    """Per-stream EMA statistics (policy `bn`; RoTTA's RBN with `fixed_momentum`)."""

    alpha: float = 1.0  # weight of the adapted statistics against the source's
    request_prior: float | None = 16.0  # pseudo-samples of history against a request
    source_prior: float = 16.0  # pseudo-samples of source statistics in a fresh stream
    momentum_floor: float = 1e-3  # per-sample EMA momentum once the stream is long
    fixed_momentum: float | None = None  # per 64 samples (RBN); overrides the schedule
    update_from: str = "known"  # samples that update the statistics: all, known, accepted
    # With `adaptive_request_weight`, a stream whose recent requests looked i.i.d.
    # (diverse predictions) weighs each request by n / (n + request_prior), and a stream
    # whose requests are class-correlated weighs them like history (momentum), so that
    # class-biased batch statistics cannot take over.
    adaptive_request_weight: bool = False
    diversity_threshold: float = 0.7  # H(mean p) / H(source prior) below this: correlated
    diversity_min_batch: int = 16
    # With `diversity_from_labels`, a request's diversity is that of its predicted labels
    # (one-hot argmax) rather than of its mean probabilities: under a strong corruption the
    # probabilities are diffuse, so their mean looks i.i.d. even for a class-correlated
    # request, while the predicted labels still concentrate on a few classes.
    diversity_from_labels: bool = False
    # With `class_balanced`, samples are weighted by pi_source(y) / pi_stream(y) (soft, from
    # the stream's label-prior estimate) when they update the statistics, so that label
    # shift does not bias the stream's BN statistics (RoTTA's class-balanced feed, without
    # a memory bank).
    class_balanced: bool = False
    # With `class_sensitivity_scale` (tau), a request's own weight in layer l uses
    # request_prior * (1 + s_l / tau), where s_l is how far the source's class means spread
    # in that layer (in source-variance units): deep, class-specific layers trust one
    # request's class-biased moments less than the early layers that see the corruption.
    class_sensitivity_scale: float | None = None
    # With `shift_gate` (lo, hi), alpha is scaled per request by how far its statistics sit
    # from the source's, as the forward pass goes: at layer l, d = mean over the layers so
    # far that are not class-specific of mean_c |log(var_target / var_source)|, and the gate
    # is clip((d - lo) / (hi - lo), 0, 1). Label shift on clean data leaves those layers'
    # statistics near the source (d < lo: the source model answers); corruptions move them.
    shift_gate: tuple[float, float] | None = None
    class_specific_sensitivity: float = 0.04  # s_l above this: layer l is class-specific
    # In the class-specific layers, alpha is further scaled by `class_specific_alpha`: those
    # layers keep part of the source statistics, because a stream's statistics there lean
    # toward the classes it has seen lately (class-correlated order, label shift), and
    # class-balanced updates undo that only as far as the predictions are right.
    class_specific_alpha: float = 1.0
    # With `class_specific_alpha_correlated`, a stream whose requests look class-correlated
    # (diversity below `diversity_threshold`: class order, label shift) keeps this share in
    # its class-specific layers instead (an i.i.d.-looking stream keeps `class_specific_alpha`).
    class_specific_alpha_correlated: float | None = None
    # With `switch_gate` (lo, hi), a request of at least `switch_min_batch` samples whose
    # statistics sit far from its stream's in the layers that are not class-specific (mean
    # |log var ratio| ramping lo -> hi) is taken as a domain switch: it weighs
    # `switch_request_weight` against its stream's statistics in every layer (None:
    # n / (n + request_prior), as the layers that are not class-specific weigh it; 1.0:
    # the request's own statistics, as BN-adapt uses, since the history is of another
    # domain), and the stream update moves with momentum up to `switch_momentum`, so that
    # stale history is forgotten fast.
    switch_gate: tuple[float, float] | None = None
    switch_min_batch: int = 16
    switch_momentum: float = 0.5
    switch_request_weight: float | None = None
    # With `instance_weight` (beta), in the first `instance_layers` layers (those that are
    # not class-specific) a sample whose own variance sits far from its request's target
    # (mean over channels of |log(var_i / var_target)| ramping over `instance_gate`) is
    # normalized with the target mixed with its instance moments by up to beta: a
    # low-contrast or noisy image among others (mixed domains, one image at a time) is
    # normalized more like itself.
    instance_weight: float = 0.0
    instance_layers: int = 3
    instance_gate: tuple[float, float] = (0.5, 1.0)
    # With `instance_shrink_gate` (lo, hi), the instance weight is further scaled per
    # request by how far its target variances have shrunk below the source's (mean over
    # channels, and over the instance layers so far, of -log(var_target / var_source),
    # ramping lo -> hi): low-contrast streams (contrast, fog) get instance moments; streams
    # whose variances grow (noise) or barely move (JPEG, clean) do not.
    instance_shrink_gate: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        shares = ("alpha", "class_specific_alpha", "class_specific_alpha_correlated", "switch_request_weight")  # fmt: skip
        for name in shares:
            if not 0.0 <= (getattr(self, name) or 0.0) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if (self.request_prior or 0) < 0 or self.source_prior < 0 or not 0 < self.momentum_floor <= 1:  # fmt: skip
            raise ValueError("priors must be >= 0 and momentum_floor in (0, 1]")
        if not 0.0 <= self.instance_weight <= 1.0:
            raise ValueError(f"instance_weight must be in [0, 1], got {self.instance_weight}")
        for name in ("shift_gate", "switch_gate", "instance_gate", "instance_shrink_gate"):
            gate = getattr(self, name)
            if gate is not None and not 0 <= gate[0] < gate[1]:
                raise ValueError(f"{name} must be (lo, hi) with 0 <= lo < hi, got {gate}")

    def momentum(self, n: torch.Tensor | float, seen: torch.Tensor | float) -> torch.Tensor:
        n, seen = torch.as_tensor(n, dtype=torch.float32), torch.as_tensor(seen, dtype=torch.float32)  # fmt: skip
        if self.fixed_momentum is not None:
            return 1 - (1 - self.fixed_momentum) ** (n / 64)
        cumulative = n / (seen + n + self.source_prior)
        return torch.maximum(cumulative, 1 - (1 - self.momentum_floor) ** n)

    def init_state(self, source: SourceModel) -> StateTensors:
        state: StateTensors = {SAMPLES_KEY: torch.zeros(1), DIVERSITY_KEY: torch.ones(1)}
        if self.class_sensitivity_scale is not None:
            state[SENSITIVITY_KEY] = _class_sensitivity(source)
        for layer, norm in enumerate(source.layers):
            mean_key, var_key = state_keys(layer)
            state[mean_key] = norm.running_mean.clone()
            state[var_key] = norm.running_var.clone()
        return state

    def _request_weights(self, state: StateTensors, n: torch.Tensor) -> torch.Tensor:
        """Each request's weight against its stream's statistics, in every layer at once:
        (R, 1) when all layers weigh a request alike, (R, L) with class sensitivity."""
        history = self.momentum(n, state[SAMPLES_KEY].flatten())
        if self.request_prior is None:
            return history.unsqueeze(1)
        prior = torch.as_tensor(self.request_prior)
        if self.class_sensitivity_scale is not None and SENSITIVITY_KEY in state:
            sensitivity = state[SENSITIVITY_KEY]  # (R, L) stacked, or one stream's (L,)
            sensitivity = sensitivity.reshape(-1, sensitivity.shape[-1])
            prior = prior * (1 + sensitivity / self.class_sensitivity_scale)
            n, history = n.unsqueeze(1), history.unsqueeze(1)
        own = _own_weight(n, prior)
        if self.adaptive_request_weight:
            iid = self._looks_iid(state)
            own = torch.where(iid if own.dim() == 1 else iid.unsqueeze(1), own, history)
        return own if own.dim() == 2 else own.unsqueeze(1)

    def _request_weight(self, state: StateTensors, n: torch.Tensor, layer: int) -> torch.Tensor:
        """Each request's weight (R,) against its stream's statistics in `layer`."""
        return _layer_column(self._request_weights(state, n), layer)[:, 0]

    def prepare(self, state: StateTensors, segments: Segments) -> StateTensors:
        """Per forward pass: the request weights of every layer, computed once."""
        prepared = {REQUEST_WEIGHTS_KEY: self._request_weights(state, segments.sizes)}
        if self.shift_gate is not None:
            prepared[SHIFT_EVIDENCE_KEY] = torch.zeros(segments.count, 1)
        if self.switch_gate is not None:  # empty when no request is large enough to switch
            eligible = bool((segments.sizes >= self.switch_min_batch).any())
            prepared[SWITCH_EVIDENCE_KEY] = torch.zeros(segments.count if eligible else 0, 1)
        if self.instance_weight and self.instance_shrink_gate is not None:
            prepared[SHRINK_EVIDENCE_KEY] = torch.zeros(segments.count, 1)
        if SENSITIVITY_KEY in state and self._uses_layer_plan:
            prepared[LAYER_PLAN_KEY] = self._plan(state)
        return prepared

    @property
    def _uses_layer_plan(self) -> bool:
        """Whether layers are treated by kind (class-specific or not)."""
        return self.shift_gate is not None or self.switch_gate is not None or self.class_specific_alpha != 1.0 or self.class_specific_alpha_correlated is not None  # fmt: skip

    def _plan(self, state: StateTensors) -> LayerPlan:
        """Per layer: whether it is class-specific, and how many layers up to it are not."""
        sensitivity = state[SENSITIVITY_KEY]
        flags = (sensitivity.reshape(-1, sensitivity.shape[-1])[0] > self.class_specific_sensitivity).tolist()  # fmt: skip
        plan, count = [], 0
        for specific in flags:
            count += not specific
            plan.append((bool(specific), count))
        return tuple(plan)

    def _specific_layers(self, state: StateTensors, layers: int) -> list[bool]:
        """Per layer, whether it is class-specific (none without class statistics)."""
        if SENSITIVITY_KEY not in state:
            return [False] * layers
        return [specific for specific, _ in self._plan(state)]

    def _layer_plan(self, layer: int, state: StateTensors) -> tuple[bool, int]:
        """Whether `layer` is class-specific, and how many layers up to it are not."""
        plan = state.get(LAYER_PLAN_KEY)
        if plan is None and SENSITIVITY_KEY in state:  # not prepared: the same from the state
            plan = self._plan(state)
        if plan is None:  # no class statistics: no layer is class-specific
            return False, layer + 1
        return plan[layer]  # type: ignore[return-value]

    @staticmethod
    def _balance_weights(state: StateTensors, obs: Observation, source: SourceModel) -> torch.Tensor | None:  # fmt: skip
        prior = state.get(PRIOR_KEY)
        if prior is None:
            return None
        ratio = source.prior / prior.clamp_min(1e-6)
        return (obs.probs * ratio).sum(1)

    def layer_statistics(
        self,
        layer: int,
        state: StateTensors,
        mean: torch.Tensor,
        var: torch.Tensor,
        segments: Segments,
        norm: StreamNorm,
    ) -> Normalization:
        mean_key, var_key = state_keys(layer)
        req_mean, req_var = segment_moments(mean, var, segments)
        w = state.get(REQUEST_WEIGHTS_KEY)  # prepared by the runner, once per forward
        if w is None:
            w = self._request_weights(state, segments.sizes)
        w = _layer_column(w, layer)
        specific, count = self._layer_plan(layer, state) if self._uses_layer_plan else (False, 0)
        if self.switch_gate is not None and _has_rows(state, SWITCH_EVIDENCE_KEY):
            distance = None if specific else _log_var_distance(req_var, state[var_key])
            switch = _accumulate(state, SWITCH_EVIDENCE_KEY, distance, count, self.switch_gate)
            n = segments.sizes.unsqueeze(1)
            if self.switch_request_weight is not None:
                full: torch.Tensor | float = self.switch_request_weight
            else:
                full = _own_weight(n, self.request_prior) if self.request_prior is not None else w
            w = w + switch * (n >= self.switch_min_batch) * (full - w)
        tgt_mean, tgt_var = mix_moments(state[mean_key], state[var_key], req_mean, req_var, w)
        alpha: torch.Tensor | float = self.alpha
        if self.shift_gate is not None:
            distance = None if specific else _log_var_distance(tgt_var, norm.running_var)
            alpha = _accumulate(state, SHIFT_EVIDENCE_KEY, distance, count, self.shift_gate)
            if self.alpha != 1.0:
                alpha = alpha * self.alpha
        if specific:  # a mixture of mixtures: alphas multiply
            alpha = alpha * self._class_specific_alpha(state)
        if self.instance_weight and not specific and layer < self.instance_layers:
            shrink = None
            if self.instance_shrink_gate is not None:  # over the non-class-specific layers so far
                shrink = _accumulate(state, SHRINK_EVIDENCE_KEY, _log_var_shrink(tgt_var, norm.running_var), count or layer + 1, self.instance_shrink_gate)  # fmt: skip
            per_sample_mean, per_sample_var = self._with_instances(tgt_mean, tgt_var, mean, var, segments, shrink)  # fmt: skip
            if isinstance(alpha, torch.Tensor):
                alpha = segments.per_sample(alpha)
            mu, sigma2 = mix_moments(norm.running_mean, norm.running_var, per_sample_mean, per_sample_var, alpha)  # fmt: skip
            return Normalization(mu, sigma2.clamp_min(0.0))
        return source_mixed_normalization(norm, tgt_mean, tgt_var, alpha, segments)

    def _class_specific_alpha(self, state: StateTensors) -> torch.Tensor | float:
        """The share of adapted statistics a class-specific layer keeps: per request (R, 1)
        by how class-correlated its stream looks (`class_specific_alpha_correlated`), or one
        value."""
        if self.class_specific_alpha_correlated is None:
            return self.class_specific_alpha
        iid = self._looks_iid(state).unsqueeze(1)
        return torch.where(iid, self.class_specific_alpha, self.class_specific_alpha_correlated)

    def _looks_iid(self, state: StateTensors) -> torch.Tensor:
        """(R,) bool: whether each stream's recent requests looked i.i.d. (their prediction
        diversity at least `diversity_threshold`), not class-correlated."""
        return state[DIVERSITY_KEY].flatten() >= self.diversity_threshold

    def _with_instances(self, tgt_mean: torch.Tensor, tgt_var: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, segments: Segments, gate: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """Per sample (N, C): its request's target moments mixed with its own instance
        moments by `instance_weight`, gated by how far its variance is from the target's
        and, when given, by its request's `gate` (R, 1)."""
        t_mean, t_var = segments.per_sample(tgt_mean), segments.per_sample(tgt_var)
        weight = self.instance_weight * _ramp(_log_var_distance(var, t_var), self.instance_gate)
        if gate is not None:  # (R, 1) per request
            weight = weight * segments.per_sample(gate)
        return mix_moments(t_mean, t_var, mean, var, weight)

    def _switch(self, state: StateTensors, obs: Observation) -> torch.Tensor | float:
        """How surely the observed samples come from another domain than the stream's
        statistics (0..1), from the layers that are not class-specific."""
        if self.switch_gate is None or obs.count < self.switch_min_batch or not obs.moments:
            return 0.0
        specific = self._specific_layers(state, len(obs.moments))
        distances = [
            _log_var_distance(
                pooled_moments(mean, var)[1].unsqueeze(0), state[state_keys(layer)[1]].unsqueeze(0)
            )  # fmt: skip
            for layer, (mean, var) in enumerate(obs.moments)
            if not specific[layer]
        ]
        if not distances:
            return 0.0
        return _ramp(torch.stack(distances).mean(), self.switch_gate)

    def _diversity_input(self, probs: torch.Tensor) -> torch.Tensor:
        """What a request's diversity is measured on: its probabilities (N, K), or its
        predicted labels one-hot (`diversity_from_labels`)."""
        if not self.diversity_from_labels:
            return probs
        return torch.nn.functional.one_hot(probs.argmax(1), probs.shape[1]).to(probs.dtype)

    def update_batch(self, state: StateTensors, obs: BatchObservation, source: SourceModel) -> StateTensors:  # fmt: skip
        """`update` for every request of a forward pass at once (row r from request r)."""
        return _batch_update(self, state, obs, source)

    def update(self, state: StateTensors, obs: Observation, source: SourceModel) -> StateTensors:
        obs = obs.select(self.update_from)
        n = obs.count
        if n == 0:
            return state
        seen = state[SAMPLES_KEY]
        momentum = self.momentum(n, seen)
        if self.switch_gate is not None:  # a domain switch: forget the stale history fast
            momentum = torch.maximum(momentum, torch.as_tensor(self._switch(state, obs) * self.switch_momentum))  # fmt: skip
        new_state = dict(state)
        weights = self._balance_weights(state, obs, source) if self.class_balanced else None
        if obs.moments:
            new_state.update(_updated_statistics(state, obs.moments, weights, momentum))
        new_state[SAMPLES_KEY] = seen + n
        if n >= self.diversity_min_batch:
            new_state[DIVERSITY_KEY] = 0.7 * state[DIVERSITY_KEY] + 0.3 * prediction_diversity(self._diversity_input(obs.probs), source.prior)  # fmt: skip
        return new_state


def _own_weight(n: torch.Tensor, prior: torch.Tensor | float) -> torch.Tensor:
    """A request of n samples against `prior` pseudo-samples of history: n / (n + prior)."""
    return n / (n + prior)


def _batch_update(stats: EmaStatistics, state: StateTensors, obs: BatchObservation, source: SourceModel) -> StateTensors:  # fmt: skip
    """`EmaStatistics.update` for all requests of a forward pass at once (see there)."""
    seg = obs.segments
    mask = obs.mask(stats.update_from)
    n = obs.count(stats.update_from)  # (R,) samples that update each stream
    seen = state[SAMPLES_KEY].reshape(-1)
    momentum = stats.momentum(n, seen)  # 0 where n = 0: those rows stay exactly as they were
    if stats.switch_gate is not None and obs.moments:
        eligible = n >= stats.switch_min_batch
        if bool(eligible.any()):
            switch = _batch_switch(stats, state, obs.moments, mask, seg)
            momentum = torch.maximum(momentum, torch.where(eligible, switch * stats.switch_momentum, 0.0))  # fmt: skip
    weights = mask
    if stats.class_balanced and PRIOR_KEY in state:
        ratio = source.prior / state[PRIOR_KEY].clamp_min(1e-6)  # (R, K)
        weights = mask * (obs.probs * seg.per_sample(ratio)).sum(1)
    new_state = dict(state)
    if obs.moments:
        keys = [state_keys(layer) for layer in range(len(obs.moments))]
        means = torch.cat([m for m, _ in obs.moments], 1)
        variances = torch.cat([v for _, v in obs.moments], 1)
        pooled_mean, pooled_var = weighted_segment_moments(means, variances, seg, weights)
        old_mean = torch.cat([state[mean_key] for mean_key, _ in keys], 1)
        old_var = torch.cat([state[var_key] for _, var_key in keys], 1)
        new_mean, new_var = mix_moments(old_mean, old_var, pooled_mean, pooled_var, momentum.unsqueeze(1))  # fmt: skip
        sizes = [m.shape[1] for m, _ in obs.moments]
        for (mean_key, var_key), mean, var in zip(keys, new_mean.split(sizes, 1), new_var.clamp_min(0.0).split(sizes, 1), strict=True):  # fmt: skip
            new_state[mean_key], new_state[var_key] = mean, var
    new_state[SAMPLES_KEY] = state[SAMPLES_KEY] + n.view_as(state[SAMPLES_KEY])
    diverse = n >= stats.diversity_min_batch
    if bool(diverse.any()):
        diversity = marginal_diversity(seg.mean(stats._diversity_input(obs.probs), mask), source.prior)  # fmt: skip
        old = state[DIVERSITY_KEY]
        moved = 0.7 * old + 0.3 * diversity.view_as(old)
        new_state[DIVERSITY_KEY] = torch.where(diverse.view_as(old), moved, old)
    return new_state


def _batch_switch(stats: EmaStatistics, state: StateTensors, moments: list[tuple[torch.Tensor, torch.Tensor]], mask: torch.Tensor, seg: Segments) -> torch.Tensor:  # fmt: skip
    """(R,) `EmaStatistics._switch` of every request: how surely its (masked) samples come
    from another domain than its stream's statistics."""
    specific = stats._specific_layers(state, len(moments))
    distances = []
    for layer, (mean, var) in enumerate(moments):
        if specific[layer]:
            continue
        _, pooled_var = weighted_segment_moments(mean, var, seg, mask)
        distances.append(_log_var_distance(pooled_var, state[state_keys(layer)[1]]))
    if not distances:
        return torch.zeros(seg.count, device=mask.device)
    return _ramp(torch.cat(distances, 1).mean(1), stats.switch_gate)  # type: ignore[arg-type]


def _log_var_distance(var: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """(R, 1) mean over channels of |log(var / reference)|, detached: gates decide, they
    are no path for gradients."""
    return _log_var_ratio(var, reference).abs_().mean(-1, keepdim=True)


def _log_var_shrink(var: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """(R, 1) mean over channels of -log(var / reference): positive where variances shrank
    (low contrast), negative where they grew (noise); detached like `_log_var_distance`."""
    return _log_var_ratio(var, reference).mean(-1, keepdim=True).neg_()


def _log_var_ratio(var: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """log(var / reference) per channel, both clamped at 1e-12, detached (a new tensor)."""
    if var.requires_grad:
        var = var.detach()
    return (var.clamp_min(1e-12) / reference.detach().clamp_min(1e-12)).log_()


def _ramp(d: torch.Tensor, gate: tuple[float, float]) -> torch.Tensor:
    lo, hi = gate
    return ((d - lo) / (hi - lo)).clamp(0.0, 1.0)


def _has_rows(state: StateTensors, key: str) -> bool:
    """Whether the forward's evidence under `key` has rows (empty: the gate cannot open);
    a missing key raises, as in `_accumulate`."""
    evidence = state.get(key)
    return evidence is None or evidence.shape[0] > 0


def _accumulate(state: StateTensors, key: str, distance: torch.Tensor | None, count: int, gate: tuple[float, float]) -> torch.Tensor:  # fmt: skip
    """Add a layer's (R, 1) distance to the forward's evidence under `key` (None: a layer
    that gives none) and return each request's (R, 1) gate from the mean distance over the
    `count` layers that gave one so far."""
    evidence = state.get(key)
    if evidence is None:
        raise ValueError("the gates accumulate evidence over a forward pass: call prepare() first")  # fmt: skip
    if distance is not None:  # per forward (never stream state): the sum so far, in the dict
        evidence = state[key] = evidence + distance
    lo, hi = gate
    scale = 1.0 / ((hi - lo) * max(count, 1))
    return evidence.mul(scale).sub_(lo / (hi - lo)).clamp_(0.0, 1.0)


def _layer_column(weights: torch.Tensor, layer: int) -> torch.Tensor:
    """A layer's (R, 1) column of request weights that are (R, L), or shared (R, 1)."""
    return weights[:, layer : layer + 1] if weights.shape[1] > 1 else weights


def _updated_statistics(
    state: StateTensors,
    moments: list[tuple[torch.Tensor, torch.Tensor]],
    weights: torch.Tensor | None,
    momentum: torch.Tensor,
) -> StateTensors:
    """Every layer's stream statistics moved towards the samples' pooled moments.

    All layers in one go, their channels side by side: the mix is elementwise, so each value
    is the one a mix per layer gives (the new state tensors are views of one buffer)."""
    keys = [state_keys(layer) for layer in range(len(moments))]
    if moments[0][0].shape[0] == 1:  # pooling one sample reduces nothing: all layers at once
        means, variances = torch.cat([m for m, _ in moments], 1), torch.cat([v for _, v in moments], 1)  # fmt: skip
        obs_mean, obs_var = pooled_moments(means, variances, weights)
    else:  # per layer: a reduction's summation order depends on the width of its input
        pooled = [pooled_moments(mean, var, weights) for mean, var in moments]
        obs_mean, obs_var = torch.cat([m for m, _ in pooled]), torch.cat([v for _, v in pooled])
    old_mean = torch.cat([state[mean_key] for mean_key, _ in keys])
    old_var = torch.cat([state[var_key] for _, var_key in keys])
    new_mean, new_var = mix_moments(old_mean, old_var, obs_mean, obs_var, momentum)
    sizes = [mean.shape[-1] for mean, _ in moments]
    updated: StateTensors = {}
    for (mean_key, var_key), mean, var in zip(keys, new_mean.split(sizes), new_var.clamp_min(0.0).split(sizes), strict=True):  # fmt: skip
        updated[mean_key], updated[var_key] = mean, var
    return updated


def _class_sensitivity(source: SourceModel) -> torch.Tensor:
    if source.class_moments is None:  # a package without class statistics: no layer differs
        return torch.zeros(len(source.layers))
    return class_sensitivity(source.class_moments, [norm.running_var for norm in source.layers])


def prediction_diversity(probs: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
    """H(mean prediction) / H(prior): near 1 for an i.i.d. batch, low for a correlated one."""
    return marginal_diversity(probs.mean(0), prior).reshape(1)


def marginal_diversity(marginal: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
    """H(marginal) / H(prior) of class distributions (..., K) -> (...)."""
    h = -(marginal * marginal.clamp_min(1e-12).log()).sum(-1)
    return h / -(prior * prior.clamp_min(1e-12).log()).sum()
