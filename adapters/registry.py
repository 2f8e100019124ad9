"""Policies by name. A new policy is one module and one line here."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ttaserve.adapters.ema_batchnorm import EmaBatchNormPolicy
from ttaserve.adapters.policy import AdaptationPolicy
from ttaserve.adapters.source import SourcePolicy

POLICIES: dict[str, Callable[..., AdaptationPolicy]] = {
    "source": SourcePolicy,
    "bn": EmaBatchNormPolicy,
}


def build_policy(name: str, **params: Any) -> AdaptationPolicy:
    """Instantiate the policy `name` with optional parameter overrides."""
    factory = POLICIES.get(name)
    if factory is None:
        raise KeyError(f"unknown policy {name!r}; known: {', '.join(sorted(POLICIES))}")
    return factory(**params)
