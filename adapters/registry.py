"""Policies by name. A new policy is one module and one entry here.

`default` is the combination the project recommends (see README, "Adaptation policies");
the reference rows reproduce published methods as closely as a per-stream server allows,
and say where they deviate.
"""

from __future__ import annotations

import ast
from collections.abc import Callable
from dataclasses import asdict, replace
from typing import Any

from ttaserve.adapters.batch_statistics import BatchStatistics
from ttaserve.adapters.collapse_guard import CollapseGuard
from ttaserve.adapters.composed import ComposedPolicy
from ttaserve.adapters.ema_batchnorm import EmaStatistics
from ttaserve.adapters.entropy_minimization import EntropyMinimization
from ttaserve.adapters.feature_open_set import FeatureOpenSetGate
from ttaserve.adapters.label_shift_adapter import LabelShiftCorrection
from ttaserve.adapters.lame import LameCorrection
from ttaserve.adapters.policy import AdaptationPolicy
from ttaserve.adapters.prior_correction import PriorCorrection
from ttaserve.adapters.reliability_gate import CrowdGate, EnergyOpenSetGate, EntropyGate
from ttaserve.adapters.source import SourceStatistics
from ttaserve.adapters.unmix_tns import UnmixStatistics


def _source(**_: Any) -> ComposedPolicy:
    return ComposedPolicy("source", SourceStatistics(), description="the frozen model")


def _bn(**params: Any) -> ComposedPolicy:
    return ComposedPolicy("bn", EmaStatistics(**params), description="per-stream EMA BN statistics mixed with each request's")  # fmt: skip


def _unmix(**params: Any) -> ComposedPolicy:
    return ComposedPolicy("unmix", UnmixStatistics(**params), description="UnMix-TNS: K=16 statistic components per layer")  # fmt: skip


def _lame(**params: Any) -> ComposedPolicy:
    return ComposedPolicy("lame", SourceStatistics(), outputs=(LameCorrection(only_if_correlated=False, min_batch=2, **params),), description="LAME on every request, frozen model (reference; also for models without BN)")  # fmt: skip


def _tent(**params: Any) -> ComposedPolicy:
    return ComposedPolicy(
        "tent",
        default_statistics(),
        affine=EntropyMinimization(**({"pull_to_source": 0.05} | params)),
        gates=(EnergyOpenSetGate(),),
        guard=CollapseGuard(),
        description="per-stream ETA-weighted entropy minimization of BN affine (SGD, pulled 5% back to source each step) on the `default` statistics, with a collapse guard",  # fmt: skip
    )


def default_statistics() -> EmaStatistics:
    """The statistics piece of `default` (and of `tent`): measured in docs/benchmarks/accuracy.md."""
    return EmaStatistics(
        adaptive_request_weight=True,
        diversity_threshold=0.85,
        diversity_from_labels=True,  # diffuse probabilities under corruption hide correlation
        source_prior=4.0,
        class_balanced=True,
        class_sensitivity_scale=0.01,
        shift_gate=(0.035, 0.06),  # clean streams under label shift stay at the source model
        switch_gate=(0.2, 0.5),  # a request from a new domain is trusted and forgets history:
        switch_request_weight=1.0,  # it is normalized with its own statistics (BN-adapt)
        class_specific_alpha=0.5,  # the class-specific layers keep half the source statistics,
        class_specific_alpha_correlated=0.0,  # all of them while the stream looks class-correlated
        instance_weight=0.5,  # low-contrast streams: images normalized up to half with their own
        instance_shrink_gate=(0.4, 0.8),  # moments in the first layers (variances shrank)
    )


def _default(**_: Any) -> ComposedPolicy:
    return ComposedPolicy(
        "default",
        default_statistics(),
        outputs=(PriorCorrection(), LameCorrection()),
        gates=(FeatureOpenSetGate(), EntropyGate()),
        guard=CollapseGuard(),
        description="class-balanced EMA statistics (a request weighs n/(n+16) while the stream looks i.i.d., like history otherwise; less in class-specific layers, which keep half the source statistics, all of them while the stream looks class-correlated), used only as far as the class-independent layers show a covariate shift, trusted fully when they show a domain switch; in low-contrast streams (variances shrank) images are normalized partly with their own moments in the first layers + open-set gate on mid-network feature statistics + online label-prior correction + LAME on correlated requests + collapse guard",  # fmt: skip
    )


def _default_lsa(**_: Any) -> ComposedPolicy:
    base = _default()
    outputs = tuple(LabelShiftCorrection(**asdict(p)) if isinstance(p, PriorCorrection) else p for p in base.outputs)  # fmt: skip
    return replace(base, name="default_lsa", outputs=outputs, description="`default` with the package's learned label shift adapter in place of the training-free prior correction (the same without one)")  # fmt: skip


# reference rows (published methods)
def _tbn(**_: Any) -> ComposedPolicy:
    return ComposedPolicy("tbn", BatchStatistics(alpha=1.0), description="BN-adapt: test-batch statistics (reference)")  # fmt: skip


def _alpha_bn(alpha: float = 0.1) -> ComposedPolicy:
    return ComposedPolicy("alpha_bn", BatchStatistics(alpha=alpha), description="alpha-BN: source/batch mix, alpha 0.1 (reference)")  # fmt: skip


def _rotta(**_: Any) -> ComposedPolicy:
    return ComposedPolicy("rotta", EmaStatistics(request_prior=None, fixed_momentum=0.05, update_from="all"), description="RoTTA's robust BN (momentum 0.05) without its memory bank and teacher (reference)")  # fmt: skip


def _tent_paper(**_: Any) -> ComposedPolicy:
    return ComposedPolicy("tent_paper", BatchStatistics(alpha=1.0), affine=EntropyMinimization(sample_filter="none", pull_to_source=0.0), description="TENT: batch statistics + entropy minimization of BN affine, SGD (reference)")  # fmt: skip


def _eata(**_: Any) -> ComposedPolicy:
    return ComposedPolicy("eata", BatchStatistics(alpha=1.0), affine=EntropyMinimization(sample_filter="eta", pull_to_source=0.0), description="EATA without the Fisher term (= ETA): entropy-filtered, weighted (reference)")  # fmt: skip


def _sar(**_: Any) -> ComposedPolicy:
    return ComposedPolicy("sar", BatchStatistics(alpha=1.0), affine=EntropyMinimization(sample_filter="sar", pull_to_source=0.0), guard=CollapseGuard(entropy_floor=0.2 / 2.302585, min_reliable=0.0), description="SAR without SAM's second step: reliable-entropy filter + entropy-EMA reset (reference)")  # fmt: skip


def _roid(**_: Any) -> ComposedPolicy:
    return ComposedPolicy("roid", BatchStatistics(alpha=1.0), affine=EntropyMinimization(sample_filter="roid", pull_to_source=0.01), outputs=(PriorCorrection(rate=0.0, batch_em=True, batch_prior=1.0),), description="ROID-style: certainty-weighted entropy, weight ensembling to source, batch prior correction (reference)")  # fmt: skip


def _crowd(**_: Any) -> ComposedPolicy:
    return ComposedPolicy("crowd", EmaStatistics(request_prior=None, update_from="accepted"), gates=(CrowdGate(),), description="EMA statistics fed only by samples whose confidence did not drop (wisdom-of-crowds filter; 2 forwards)")  # fmt: skip


POLICIES: dict[str, Callable[..., AdaptationPolicy]] = {
    "default": _default,
    "default_lsa": _default_lsa,
    "source": _source,
    "bn": _bn,
    "unmix": _unmix,
    "tent": _tent,
    "lame": _lame,
    "crowd": _crowd,
    "tbn": _tbn,
    "alpha_bn": _alpha_bn,
    "rotta": _rotta,
    "tent_paper": _tent_paper,
    "eata": _eata,
    "sar": _sar,
    "roid": _roid,
}


def build_policy(name: str, **params: Any) -> AdaptationPolicy:
    """Instantiate the policy `name` with optional parameter overrides."""
    factory = POLICIES.get(name)
    if factory is None:
        raise KeyError(f"unknown policy {name!r}; known: {', '.join(sorted(POLICIES))}")
    return factory(**params)


def parse_variant(spec: str) -> tuple[str, str, dict[str, Any]]:
    """`NAME=BASE:field=value;field=value` -> (name, base, overrides); values are Python
    literals (`0.25`, `None`, `(0.2, 0.5)`), read with `ast.literal_eval`."""
    name, sep, rest = spec.partition("=")
    base, sep2, fields = rest.partition(":")
    if not sep or not sep2 or not name.strip() or not base.strip():
        raise ValueError(f"variant {spec!r}: expected NAME=BASE:field=value;field=value")
    overrides: dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in fields.split(";"))):
        key, eq, value = item.partition("=")
        if not eq:
            raise ValueError(f"variant {spec!r}: {item!r} is not field=value")
        try:
            overrides[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError) as exc:
            raise ValueError(
                f"variant {spec!r}: {value.strip()!r} is not a Python literal"
            ) from exc
    return name.strip(), base.strip(), overrides


def register_variant(name: str, base: str, statistics: dict[str, Any]) -> None:
    """Register policy `name`: policy `base` with fields of its statistics piece replaced
    (for ablations, e.g. `ttaserve bench accuracy --variant`). Registering the same
    variant again is a no-op; another policy of that name is an error."""
    built = build_policy(base)
    description = f"`{base}` with {statistics} (variant)"
    try:
        variant = replace(built, name=name, statistics=replace(built.statistics, **statistics), description=description)  # type: ignore[type-var]  # fmt: skip
    except TypeError as exc:
        raise ValueError(f"variant {name!r}: {exc}") from exc
    existing = POLICIES.get(name)
    if existing is not None and existing() != variant:  # policies are frozen dataclasses
        raise ValueError(f"policy {name!r} already exists")

    def factory(**_: Any) -> AdaptationPolicy:
        return variant  # frozen and stateless, like every policy

    POLICIES[name] = factory
