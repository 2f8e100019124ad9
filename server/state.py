"""The per-stream state record and its pickle-free serialization.

A record is a flat dict of named float32 tensors (the policy's state) plus a small JSON
header, written as one safetensors blob: the header rides in the safetensors metadata.
All tensors travel packed in one flat float32 tensor (`state`); their names and shapes
(the layout, the same for every stream of a policy) ride in the metadata too. In memory a
state stays packed (`PackedTensors`): decoding, checking, stacking a batch's states as one
(R, D) tensor and encoding touch one tensor instead of ~45 (they run for every stream of
every batch); the named views are made only where a piece of code asks for them.
A blob whose schema version or model fingerprint does not match is treated as a fresh
stream by the caller (`decode_state` raises `StateMismatchError`), never a crash.
"""

from __future__ import annotations

import functools
import json
import struct
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from ttaserve.adapters.policy import StateTensors

SCHEMA_VERSION = 2  # 2: tensors packed into one flat tensor (1: one safetensors entry each)
_HEADER_KEY = "ttaserve"
_LAYOUT_KEY = "ttaserve.layout"
_FLAT_KEY = "state"


class StateMismatchError(ValueError):
    """The blob is not a usable state for this server (other schema, other model, corrupt)."""


@dataclass(frozen=True)
class TensorLayout:
    """Names and shapes of the tensors packed, in order, into a state's flat tensor."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    sizes: tuple[int, ...]

    @property
    def total(self) -> int:
        return sum(self.sizes)

    @staticmethod
    def of(tensors: StateTensors) -> TensorLayout:
        return _layout(tuple((name, tuple(t.shape)) for name, t in tensors.items()))

    def pack_rows(self, stacked: StateTensors, rows: int) -> torch.Tensor:
        """Stacked named tensors (R, *shape) packed as (R, D) float32, in layout order."""
        if not self.names:
            return torch.zeros(rows, 0)
        return torch.cat([stacked[name].reshape(rows, -1) for name in self.names], 1).to(torch.float32)  # fmt: skip

    def split(self, flat: torch.Tensor) -> StateTensors:
        """Named views of a packed (D,) tensor, or of (R, D) stacked rows as (R, *shape)."""
        if not self.names:
            return {}
        lead = flat.shape[:-1]
        return {
            name: piece.view((*lead, *shape)) if shape != (size,) else piece
            for name, shape, size, piece in zip(
                self.names, self.shapes, self.sizes, flat.split(self.sizes, -1), strict=True
            )  # fmt: skip
        }


@functools.lru_cache(maxsize=256)
def _layout(key: tuple[tuple[str, tuple[int, ...]], ...]) -> TensorLayout:
    names = tuple(name for name, _ in key)
    shapes = tuple(shape for _, shape in key)
    return TensorLayout(
        names, shapes, tuple(int(np.prod(shape, dtype=np.int64)) for shape in shapes)
    )


class PackedTensors:
    """A state's named tensors packed in one flat float32 tensor, as they are stored and
    stacked: one tensor per stream to decode, check, stack and encode instead of ~45. The
    named views are made only when a piece of code asks for them."""

    __slots__ = ("flat", "layout", "_tensors")

    def __init__(self, flat: torch.Tensor, layout: TensorLayout) -> None:
        if flat.shape != (layout.total,):
            raise ValueError(f"packed tensor of shape {tuple(flat.shape)} does not fit its layout ({layout.total})")  # fmt: skip
        self.flat, self.layout = flat, layout
        self._tensors: StateTensors | None = None

    @classmethod
    def pack(cls, tensors: StateTensors) -> PackedTensors:
        """Pack named tensors (copied: later in-place changes to them do not show here)."""
        layout = TensorLayout.of(tensors)
        with torch.no_grad():
            flat = layout.pack_rows(tensors, 1)[0]
        return cls(flat, layout)

    @property
    def tensors(self) -> StateTensors:
        """The named tensors, as views of `flat` (made once)."""
        if self._tensors is None:
            self._tensors = self.layout.split(self.flat)
        return self._tensors

    @property
    def nbytes(self) -> int:
        return self.flat.numel() * self.flat.element_size()


@dataclass(frozen=True)
class StreamState:
    """One stream's adaptation state. `version` is the store's compare-and-set counter."""

    policy: str
    policy_params: dict[str, Any]
    model_fingerprint: str
    packed: PackedTensors
    version: int = 0
    samples_seen: int = 0
    updates: int = 0
    resets: int = 0
    created_at: float = field(default_factory=time.time)
    updated_at: float = field(default_factory=time.time)

    @classmethod
    def of(cls, policy: str, policy_params: dict[str, Any], model_fingerprint: str, tensors: StateTensors, **fields: Any) -> StreamState:  # fmt: skip
        """A state holding (a packed copy of) the named `tensors`."""
        return cls(policy, policy_params, model_fingerprint, PackedTensors.pack(tensors), **fields)  # fmt: skip

    @property
    def tensors(self) -> StateTensors:
        return self.packed.tensors

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

    @property
    def tensor_bytes(self) -> int:
        return self.packed.nbytes


def finite_rows(flat: torch.Tensor) -> torch.Tensor:
    """(R,) bool: which rows of stacked packed states (R, D) hold no NaN or inf."""
    return torch.isfinite(flat).all(1) if flat.shape[1] else torch.ones(flat.shape[0], dtype=torch.bool)  # fmt: skip


@functools.lru_cache(maxsize=256)
def _layout_text(layout: TensorLayout) -> str:
    return json.dumps([[name, list(shape)] for name, shape in zip(layout.names, layout.shapes, strict=True)], separators=(",", ":"))  # fmt: skip


@functools.lru_cache(maxsize=256)
def _parse_layout(text: str) -> TensorLayout:
    try:
        entries = json.loads(text)
        key = tuple((str(name), tuple(int(d) for d in shape)) for name, shape in entries)
    except (TypeError, ValueError) as exc:
        raise StateMismatchError(f"state blob has an unreadable layout: {exc}") from exc
    if any(d < 0 for _, shape in key for d in shape) or len({name for name, _ in key}) != len(key):  # fmt: skip
        raise StateMismatchError("state blob has an invalid layout")
    return _layout(key)


def encode_state(state: StreamState) -> bytes:
    """Serialize a state to a safetensors blob (no pickle): one flat float32 tensor."""
    flat = state.packed.flat
    if flat.requires_grad or flat.device.type != "cpu":
        flat = flat.detach().cpu()
    metadata = {_HEADER_KEY: json.dumps(state.header()), _LAYOUT_KEY: _layout_text(state.packed.layout)}  # fmt: skip
    return st_save({_FLAT_KEY: flat.numpy()}, metadata=metadata)  # numpy: ~3x faster


def _read_metadata(blob: bytes) -> dict[str, str]:
    if len(blob) < 8:
        raise StateMismatchError("state blob too short")
    (length,) = struct.unpack("<Q", blob[:8])
    if length > len(blob) - 8:
        raise StateMismatchError("state blob header length out of range")
    try:
        meta = json.loads(blob[8 : 8 + length])["__metadata__"]
        if not isinstance(meta, dict):
            raise TypeError("metadata is not a mapping")
        return meta
    except (KeyError, TypeError, ValueError) as exc:
        raise StateMismatchError(f"state blob has no metadata: {exc}") from exc


def decode_state(blob: bytes, model_fingerprint: str) -> StreamState:
    """Deserialize a blob written by `encode_state` for the model `model_fingerprint`."""
    meta = _read_metadata(blob)
    try:
        header = json.loads(meta[_HEADER_KEY])
        schema = header.get("schema")
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise StateMismatchError(f"state blob has no ttaserve header: {exc}") from exc
    if schema != SCHEMA_VERSION:
        raise StateMismatchError(f"state schema {schema} != {SCHEMA_VERSION}")
    if header.get("model_fingerprint") != model_fingerprint:
        raise StateMismatchError("state was written for another model")
    layout = _parse_layout(str(meta.get(_LAYOUT_KEY, "")))
    try:
        array = st_load(blob)[_FLAT_KEY]
    except Exception as exc:  # safetensors raises its own error types
        raise StateMismatchError(f"corrupt state tensors: {exc}") from exc
    if array.dtype != np.float32 or array.shape != (layout.total,):
        raise StateMismatchError("state tensor does not match its layout")
    if not np.isfinite(array).all():
        raise StateMismatchError("state holds non-finite values")
    return StreamState(
        policy=header["policy"],
        policy_params=header["policy_params"],
        model_fingerprint=header["model_fingerprint"],
        packed=PackedTensors(torch.from_numpy(array), layout),
        version=int(header["version"]),
        samples_seen=int(header["samples_seen"]),
        updates=int(header["updates"]),
        resets=int(header["resets"]),
        created_at=float(header["created_at"]),
        updated_at=float(header["updated_at"]),
    )
