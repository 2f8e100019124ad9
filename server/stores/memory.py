"""In-process state store: the embedded default. Bounded by an LRU size and a TTL.

A blob of a memory page or more lives in a page-aligned slot of a large anonymous memory
map (one free list per slot size), not on the heap: the short-lived tensors and buffers
of every batch cannot fragment the heap around thousands of long-lived blobs, so a stream
costs its blob's pages plus a small index entry, and a freed slot's pages go back to the
operating system. Smaller blobs stay plain bytes.
"""

from __future__ import annotations

import mmap
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import NamedTuple

from ttaserve.server.stores.base import StoredRecord

PAGE = mmap.PAGESIZE


class _Slot(NamedTuple):
    """Where a blob lives: slot size, map index, offset in the map, blob length."""

    size: int
    map_index: int
    offset: int
    length: int


class PagedBlobs:
    """Blobs in page-aligned slots of anonymous memory maps of about `map_bytes` each."""

    def __init__(self, map_bytes: int = 4 << 20) -> None:
        self._map_bytes = map_bytes
        self._maps: dict[int, list[mmap.mmap]] = {}  # slot size -> its maps
        self._free: dict[int, list[tuple[int, int]]] = {}  # slot size -> (map index, offset)

    @staticmethod
    def slot_size(length: int) -> int:
        return max(1, -(-length // PAGE)) * PAGE

    def put(self, data: bytes, reuse: _Slot | None = None) -> _Slot:
        """Store `data`, in place of `reuse` when that slot has the right size (else frees it)."""
        size = self.slot_size(len(data))
        if reuse is not None and reuse.size == size:
            index, offset = reuse.map_index, reuse.offset
        else:
            if reuse is not None:
                self.free(reuse)
            index, offset = self._allocate(size)
        self._maps[size][index][offset : offset + len(data)] = data
        return _Slot(size, index, offset, len(data))

    def get(self, slot: _Slot) -> bytes:
        return self._maps[slot.size][slot.map_index][slot.offset : slot.offset + slot.length]

    def free(self, slot: _Slot) -> None:
        """Return the slot to its free list and its pages to the operating system."""
        area = self._maps[slot.size][slot.map_index]
        if hasattr(area, "madvise"):
            area.madvise(mmap.MADV_DONTNEED, slot.offset, slot.size)
        self._free[slot.size].append((slot.map_index, slot.offset))

    def _allocate(self, size: int) -> tuple[int, int]:
        free = self._free.setdefault(size, [])
        if not free:
            maps = self._maps.setdefault(size, [])
            slots = max(1, self._map_bytes // size)
            maps.append(mmap.mmap(-1, slots * size))  # pages are touched only when written
            free.extend((len(maps) - 1, i * size) for i in reversed(range(slots)))
        return free.pop()

    def close(self) -> None:
        for maps in self._maps.values():
            for area in maps:
                area.close()
        self._maps.clear()
        self._free.clear()


class _Entry(NamedTuple):
    written: float
    version: int
    blob: bytes | _Slot


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
        self._records: OrderedDict[str, _Entry] = OrderedDict()
        self._blobs = PagedBlobs()
        self._max = max_streams
        self._ttl = ttl_seconds
        self._clock = clock
        self.evictions = 0

    def _live(self, key: str) -> _Entry | None:
        entry = self._records.get(key)
        if entry is None:
            return None
        if self._ttl is not None and self._clock() - entry.written > self._ttl:
            self._drop(key)
            return None
        self._records.move_to_end(key)
        return entry

    def _drop(self, key: str) -> bool:
        entry = self._records.pop(key, None)
        if entry is not None and isinstance(entry.blob, _Slot):
            self._blobs.free(entry.blob)
        return entry is not None

    def _record(self, entry: _Entry | None) -> StoredRecord | None:
        if entry is None:
            return None
        blob = entry.blob
        return StoredRecord(entry.version, blob if isinstance(blob, bytes) else self._blobs.get(blob))  # fmt: skip

    async def get_many(self, keys: Sequence[str]) -> list[StoredRecord | None]:
        return [self._record(self._live(k)) for k in keys]

    async def compare_and_set(self, key: str, expected_version: int, record: StoredRecord) -> bool:
        current = self._live(key)
        if (current.version if current else 0) != expected_version:
            return False
        old = current.blob if current is not None and isinstance(current.blob, _Slot) else None
        data = record.data
        if len(data) >= PAGE:
            blob: bytes | _Slot = self._blobs.put(data, reuse=old)
        else:
            blob = bytes(data)
            if old is not None:
                self._blobs.free(old)
        self._records[key] = _Entry(self._clock(), record.version, blob)
        self._records.move_to_end(key)
        while len(self._records) > self._max:
            self._drop(next(iter(self._records)))
            self.evictions += 1
        return True

    async def delete(self, key: str) -> bool:
        return self._drop(key)

    async def count(self) -> int:
        return len(self._records)

    async def ping(self) -> bool:
        return True

    async def close(self) -> None:
        self._records.clear()
        self._blobs.close()
