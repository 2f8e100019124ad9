"""The per-stream state record and its pickle-free serialization.

A record is a flat dict of named float32 tensors (the policy's state) plus a small JSON
header, written as one safetensors blob: the header rides in the safetensors metadata.
A blob whose schema version or model fingerprint does not match is treated as a fresh
stream by the caller (`decode_state` raises `StateMismatchError`), never a crash.
"""

from __future__ import annotations

import json
import struct
import time
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

SCHEMA_VERSION = 1
_HEADER_KEY = "ttaserve"


class StateMismatchError(ValueError):
    """The blob is not a usable state for this server (other schema, other model, corrupt)."""


@dataclass(frozen=True)
class StreamState:
    """One stream's adaptation state. `version` is the store's compare-and-set counter."""

    policy: str
    policy_params: dict[str, Any]
    model_fingerprint: str
    tensors: dict[str, torch.Tensor]
    version: int = 0
    samples_seen: int = 0
    updates: int = 0
    resets: int = 0
    created_at: float = field(default_factory=time.time)
    updated_at: float = field(default_factory=time.time)

    def header(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA_VERSION,
            "policy": self.policy,
            "policy_params": self.policy_params,
            "model_fingerprint": self.model_fingerprint,
            "version": self.version,
            "samples_seen": self.samples_seen,
            "updates": self.updates,
            "resets": self.resets,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
        }

    def with_update(
        self, tensors: dict[str, torch.Tensor], samples: int, now: float
    ) -> StreamState:
        """The state after an update from `samples` accepted-or-seen samples."""
        return replace(
            self,
            tensors=tensors,
            version=self.version + 1,
            samples_seen=self.samples_seen + samples,
            updates=self.updates + 1,
            updated_at=now,
        )

    @property
    def tensor_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


def all_finite(tensors: dict[str, torch.Tensor]) -> bool:
    """True when no tensor holds NaN or inf."""
    return all(bool(torch.isfinite(t).all()) for t in tensors.values())


def encode_state(state: StreamState) -> bytes:
    """Serialize a state to a safetensors blob (no pickle)."""
    tensors = {k: v.detach().contiguous().to(torch.float32) for k, v in state.tensors.items()}
    return st_save(tensors, metadata={_HEADER_KEY: json.dumps(state.header())})


def _read_header(blob: bytes) -> dict[str, Any]:
    if len(blob) < 8:
        raise StateMismatchError("state blob too short")
    (length,) = struct.unpack("<Q", blob[:8])
    if length > len(blob) - 8:
        raise StateMismatchError("state blob header length out of range")
    try:
        meta = json.loads(blob[8 : 8 + length])["__metadata__"][_HEADER_KEY]
        return json.loads(meta)
    except (KeyError, TypeError, ValueError) as exc:
        raise StateMismatchError(f"state blob has no ttaserve header: {exc}") from exc


def decode_state(blob: bytes, model_fingerprint: str) -> StreamState:
    """Deserialize a blob written by `encode_state` for the model `model_fingerprint`."""
    header = _read_header(blob)
    if header.get("schema") != SCHEMA_VERSION:
        raise StateMismatchError(f"state schema {header.get('schema')} != {SCHEMA_VERSION}")
    if header.get("model_fingerprint") != model_fingerprint:
        raise StateMismatchError("state was written for another model")
    try:
        tensors = st_load(blob)
    except Exception as exc:  # safetensors raises its own error types
        raise StateMismatchError(f"corrupt state tensors: {exc}") from exc
    if not all_finite(tensors):
        raise StateMismatchError("state holds non-finite values")
    return StreamState(
        policy=header["policy"],
        policy_params=header["policy_params"],
        model_fingerprint=header["model_fingerprint"],
        tensors=tensors,
        version=int(header["version"]),
        samples_seen=int(header["samples_seen"]),
        updates=int(header["updates"]),
        resets=int(header["resets"]),
        created_at=float(header["created_at"]),
        updated_at=float(header["updated_at"]),
    )
