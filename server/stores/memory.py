"""In-process state store: the embedded default. Bounded by an LRU size and a TTL."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Sequence

from ttaserve.server.stores.base import StoredRecord


class InMemoryStateStore:
    """An LRU dict of records with a time-to-live, safe within one event loop.

    All methods run without awaiting, so each call is atomic with respect to other
    coroutines: compare-and-set needs no lock.
    """

    def __init__(
        self,
        max_streams: int = 100_000,
        ttl_seconds: float | None = 24 * 3600,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_streams < 1:
            raise ValueError("max_streams must be >= 1")
        self._records: OrderedDict[str, tuple[float, StoredRecord]] = OrderedDict()
        self._max = max_streams
        self._ttl = ttl_seconds
        self._clock = clock
        self.evictions = 0

    def _live(self, key: str) -> StoredRecord | None:
        entry = self._records.get(key)
        if entry is None:
            return None
        written, record = entry
        if self._ttl is not None and self._clock() - written > self._ttl:
            del self._records[key]
            return None
        self._records.move_to_end(key)
        return record

    async def get_many(self, keys: Sequence[str]) -> list[StoredRecord | None]:
        return [self._live(k) for k in keys]

    async def compare_and_set(self, key: str, expected_version: int, record: StoredRecord) -> bool:
        current = self._live(key)
        if (current.version if current else 0) != expected_version:
            return False
        self._records[key] = (self._clock(), record)
        self._records.move_to_end(key)
        while len(self._records) > self._max:
            self._records.popitem(last=False)
            self.evictions += 1
        return True

    async def delete(self, key: str) -> bool:
        return self._records.pop(key, None) is not None

    async def count(self) -> int:
        return len(self._records)

    async def ping(self) -> bool:
        return True

    async def close(self) -> None:
        self._records.clear()
