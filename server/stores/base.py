"""The state-store contract: versioned blobs keyed by stream, with compare-and-set.

Stores deal in bytes; (de)serialization lives in `server.state`. Every implementation
(in-process memory, Redis) must pass the same contract tests.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class StoredRecord:
    """A stored state blob and the version it was written at (versions start at 1)."""

    version: int
    data: bytes


class StoreUnavailableError(RuntimeError):
    """The store cannot be reached; callers degrade instead of failing the request."""


class StateStore(Protocol):
    """Async key-value store of stream states with optimistic concurrency."""

    async def get_many(self, keys: Sequence[str]) -> list[StoredRecord | None]:
        """Records for `keys` in one round trip (None where absent or expired)."""

    async def compare_and_set(self, key: str, expected_version: int, record: StoredRecord) -> bool:
        """Write `record` if the stored version is `expected_version` (0 = absent)."""

    async def delete(self, key: str) -> bool:
        """Remove a key; True if it existed."""

    async def count(self) -> int:
        """Number of live records (approximate for remote stores)."""

    async def ping(self) -> bool:
        """True when the store is reachable."""

    async def close(self) -> None:
        """Release connections."""
