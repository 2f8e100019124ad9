"""Policies by name. A new policy is one module and one line here."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ttaserve.adapters.batch_statistics import BatchStatistics
from ttaserve.adapters.composed import ComposedPolicy
from ttaserve.adapters.ema_batchnorm import EmaStatistics
from ttaserve.adapters.policy import AdaptationPolicy
from ttaserve.adapters.source import SourceStatistics


def _source(**_: Any) -> ComposedPolicy:
    return ComposedPolicy("source", SourceStatistics(), description="the frozen model")


def _bn(**params: Any) -> ComposedPolicy:
    return ComposedPolicy("bn", EmaStatistics(**params), description="per-stream EMA BN statistics mixed with each request's")  # fmt: skip


def _tbn(**_: Any) -> ComposedPolicy:
    return ComposedPolicy("tbn", BatchStatistics(alpha=1.0), description="BN-adapt: test-batch statistics (reference)")  # fmt: skip


def _alpha_bn(alpha: float = 0.1) -> ComposedPolicy:
    return ComposedPolicy("alpha_bn", BatchStatistics(alpha=alpha), description="alpha-BN: source/batch mix, alpha 0.1 (reference)")  # fmt: skip


def _rotta(**_: Any) -> ComposedPolicy:
    return ComposedPolicy("rotta", EmaStatistics(fixed_momentum=0.05), description="RoTTA's robust BN (RBN, momentum 0.05) without its memory bank and teacher (reference)")  # fmt: skip


POLICIES: dict[str, Callable[..., AdaptationPolicy]] = {
    "source": _source,
    "bn": _bn,
    "tbn": _tbn,
    "alpha_bn": _alpha_bn,
    "rotta": _rotta,
}


def build_policy(name: str, **params: Any) -> AdaptationPolicy:
    """Instantiate the policy `name` with optional parameter overrides."""
    factory = POLICIES.get(name)
    if factory is None:
        raise KeyError(f"unknown policy {name!r}; known: {', '.join(sorted(POLICIES))}")
    return factory(**params)
