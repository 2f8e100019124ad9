"""The state-store contract, run against every store: in-process memory and a real Redis."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import pytest
from redis.asyncio import Redis
from redis_server import RedisServer, find_redis_server

from conftest import free_port
from ttaserve.server.stores.base import StateStore, StoredRecord, StoreUnavailableError
from ttaserve.server.stores.memory import PAGE, InMemoryStateStore, PagedBlobs
from ttaserve.server.stores.redis import CircuitBreaker, RedisStateStore

TTL_S = 1.0  # Redis expires keys with millisecond precision; 1 s keeps the test short


def key(stream: str) -> str:
    return f"ttaserve:tiny-test:{{{stream}}}"


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class StoreUnderTest:
    store: StateStore
    advance: Callable[[float], Awaitable[None]]  # let time pass (fake clock or a real sleep)


@pytest.fixture(params=["memory", "redis"])
async def subject(request: pytest.FixtureRequest) -> AsyncIterator[StoreUnderTest]:
    if request.param == "memory":
        clock = FakeClock()

        async def advance(seconds: float) -> None:
            clock.now += seconds

        yield StoreUnderTest(InMemoryStateStore(ttl_seconds=TTL_S, clock=clock), advance)
        return
    server: RedisServer = request.getfixturevalue("redis_server")
    store = RedisStateStore(server.url, ttl_seconds=TTL_S)
    try:
        yield StoreUnderTest(store, asyncio.sleep)
    finally:
        await store.close()


@pytest.fixture
async def raw_redis(redis_server: RedisServer) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_server.url)
    try:
        yield client
    finally:
        await client.aclose()


async def increment(store: StateStore, k: str) -> int:
    """Read-modify-write a counter with compare-and-set; returns the CAS attempts it took."""
    attempts = 0
    while True:
        attempts += 1
        (record,) = await store.get_many([k])
        version, value = (record.version, int(record.data)) if record else (0, 0)
        await asyncio.sleep(0)  # let other writers interleave between read and write
        new = StoredRecord(version + 1, str(value + 1).encode())
        if await store.compare_and_set(k, version, new):
            return attempts


# --- the contract, for every store ----------------------------------------------------------
async def test_round_trip_keeps_arbitrary_bytes(subject: StoreUnderTest) -> None:
    store = subject.store
    blobs = [b"", bytes(range(256)), b"\x00\r\n$-1\r\n*" * 10, os.urandom(1 << 20)]
    for i, blob in enumerate(blobs):
        assert await store.compare_and_set(key(f"s{i}"), 0, StoredRecord(1, blob))
    records = await store.get_many([key(f"s{i}") for i in range(len(blobs))])
    assert records == [StoredRecord(1, blob) for blob in blobs]
    assert all(type(r.data) is bytes for r in records if r)


async def test_get_many_keeps_order_and_reports_missing_keys(subject: StoreUnderTest) -> None:
    store = subject.store
    assert await store.get_many([]) == []
    a, c = StoredRecord(1, b"a"), StoredRecord(7, b"c")
    assert await store.compare_and_set(key("a"), 0, a)
    assert await store.compare_and_set(key("c"), 0, c)
    got = await store.get_many([key("c"), key("missing"), key("a"), key("c")])
    assert got == [c, None, a, c]


async def test_compare_and_set_conflicts_leave_the_record_unchanged(subject: StoreUnderTest) -> None:  # fmt: skip
    store, k = subject.store, key("s")
    assert not await store.compare_and_set(k, 1, StoredRecord(2, b"x"))  # absent is version 0
    assert await store.get_many([k]) == [None]
    assert await store.compare_and_set(k, 0, StoredRecord(1, b"one"))
    assert not await store.compare_and_set(k, 0, StoredRecord(1, b"again"))  # exists now
    assert await store.compare_and_set(k, 1, StoredRecord(2, b"two"))
    for stale in (0, 1, 3):
        assert not await store.compare_and_set(k, stale, StoredRecord(9, b"stale"))
    assert await store.get_many([k]) == [StoredRecord(2, b"two")]


async def test_concurrent_writers_never_lose_an_increment(subject: StoreUnderTest) -> None:
    writers, each = 8, 15
    k = key("counter")

    async def writer() -> int:
        return sum([await increment(subject.store, k) for _ in range(each)])

    attempts = await asyncio.gather(*(writer() for _ in range(writers)))
    (record,) = await subject.store.get_many([k])
    assert record == StoredRecord(writers * each, str(writers * each).encode())
    assert sum(attempts) > writers * each  # the writers really did conflict


async def test_records_expire_after_the_ttl_counted_from_the_last_write(subject: StoreUnderTest) -> None:  # fmt: skip
    store, k, other = subject.store, key("s"), key("other")
    assert await store.compare_and_set(k, 0, StoredRecord(1, b"one"))
    assert await store.compare_and_set(other, 0, StoredRecord(1, b"x"))
    await subject.advance(0.5 * TTL_S)
    assert await store.compare_and_set(k, 1, StoredRecord(2, b"two"))  # restarts k's TTL
    await subject.advance(0.55 * TTL_S)  # other: 1.05 TTL old, k: 0.55 (a slow host only adds)
    assert await store.get_many([k, other]) == [StoredRecord(2, b"two"), None]
    assert not await store.compare_and_set(other, 1, StoredRecord(2, b"y"))  # expired = absent
    assert await store.compare_and_set(other, 0, StoredRecord(1, b"new"))
    await subject.advance(0.5 * TTL_S)
    assert await store.get_many([k]) == [None]


async def test_delete_and_count(subject: StoreUnderTest) -> None:
    store = subject.store
    assert await store.count() == 0
    for i in range(5):
        assert await store.compare_and_set(key(f"s{i}"), 0, StoredRecord(1, b"x"))
    assert await store.count() == 5
    assert await store.delete(key("s3"))
    assert not await store.delete(key("s3"))
    assert not await store.delete(key("never"))
    assert await store.count() == 4
    assert await store.get_many([key("s3")]) == [None]
    assert await store.compare_and_set(key("s3"), 0, StoredRecord(1, b"back"))  # absent again
    assert await store.ping()


# --- in-process store -----------------------------------------------------------------------
async def test_memory_store_is_bounded_by_lru() -> None:
    store = InMemoryStateStore(max_streams=3, ttl_seconds=None)
    for name in "abc":
        assert await store.compare_and_set(name, 0, StoredRecord(1, name.encode()))
    await store.get_many(["a"])  # a becomes the most recently used
    assert await store.compare_and_set("d", 0, StoredRecord(1, b"d"))
    assert await store.get_many(["a", "b", "c", "d"]) == [
        StoredRecord(1, b"a"), None, StoredRecord(1, b"c"), StoredRecord(1, b"d"),
    ]  # fmt: skip
    assert (await store.count(), store.evictions) == (3, 1)


async def test_memory_store_keeps_page_sized_blobs_in_reused_slots() -> None:
    store = InMemoryStateStore(max_streams=4, ttl_seconds=None)
    blobs = PagedBlobs.__new__(PagedBlobs)  # only for slot_size
    sizes = [PAGE, 2 * PAGE - 24, 3 * PAGE + 1, 100]
    expected: dict[str, bytes] = {}
    version: dict[str, int] = {}
    for step in range(40):  # overwrite across slot sizes, delete, evict
        name = f"s{step % 6}"
        data = os.urandom(sizes[step % len(sizes)])
        (record,) = await store.get_many([name])  # evicted records start again at 0
        current = record.version if record else 0
        assert await store.compare_and_set(name, current, StoredRecord(current + 1, data))
        version[name], expected[name] = current + 1, data
        if step % 7 == 3:
            assert await store.delete(name)
            del version[name], expected[name]
    assert store.evictions > 0
    live = [r for r in await store.get_many(list(expected)) if r is not None]
    assert len(live) == await store.count() <= 4
    for name, record in zip(expected, await store.get_many(list(expected)), strict=True):
        if record is not None:
            assert record.data == expected[name] and record.version == version[name]
    # freed slots are reused: at most one map per slot size was ever needed
    assert all(len(maps) == 1 for maps in store._blobs._maps.values())
    assert blobs.slot_size(PAGE + 1) == 2 * PAGE and blobs.slot_size(0) == PAGE
    await store.close()


# --- Redis store ----------------------------------------------------------------------------
async def test_redis_layout_is_one_hash_per_stream_with_ttl(redis_server: RedisServer, raw_redis: Redis) -> None:  # fmt: skip
    store = RedisStateStore(redis_server.url, ttl_seconds=30)
    forever = RedisStateStore(redis_server.url, ttl_seconds=None)
    try:
        k = key("s")
        assert await store.compare_and_set(k, 0, StoredRecord(1, b"\x00blob"))
        assert await raw_redis.hgetall(k) == {b"v": b"1", b"d": b"\x00blob"}
        assert 29_000 < await raw_redis.pttl(k) <= 30_000
        assert await forever.compare_and_set(k, 1, StoredRecord(2, b"kept"))
        assert await raw_redis.pttl(k) == -1  # no expiry: an earlier TTL is removed
        assert await store.compare_and_set(k, 2, StoredRecord(3, b"x"))
        assert 29_000 < await raw_redis.pttl(k) <= 30_000
    finally:
        await store.close()
        await forever.close()


async def test_redis_count_scans_only_the_store_prefix(redis_server: RedisServer, raw_redis: Redis) -> None:  # fmt: skip
    await raw_redis.set("someone-else:key", b"1")
    scan = RedisStateStore(redis_server.url, ttl_seconds=None)
    dbsize = RedisStateStore(redis_server.url, ttl_seconds=None, count_method="dbsize")
    try:
        for i in range(2500):  # more than one SCAN page
            await raw_redis.hset(key(f"s{i}"), mapping={"v": 1, "d": b""})
        assert await scan.count() == 2500
        assert await dbsize.count() == 2501
    finally:
        await scan.close()
        await dbsize.close()


async def test_redis_writers_on_separate_clients_never_lose_an_increment(redis_server: RedisServer) -> None:  # fmt: skip
    replicas = [RedisStateStore(redis_server.url, ttl_seconds=60) for _ in range(3)]
    try:
        k = key("counter")
        await asyncio.gather(*(increment(replicas[i % 3], k) for i in range(60)))
        (record,) = await replicas[0].get_many([k])
        assert record == StoredRecord(60, b"60")
    finally:
        for r in replicas:
            await r.close()


async def test_redis_cas_script_is_reloaded_after_script_flush(redis_server: RedisServer, raw_redis: Redis) -> None:  # fmt: skip
    store = RedisStateStore(redis_server.url, ttl_seconds=60)
    try:
        assert await store.compare_and_set(key("s"), 0, StoredRecord(1, b"a"))
        await raw_redis.script_flush()  # what a Redis restart or failover does
        assert await store.compare_and_set(key("s"), 1, StoredRecord(2, b"b"))
    finally:
        await store.close()


async def test_redis_command_error_is_unavailable_but_does_not_open_the_breaker(redis_server: RedisServer, raw_redis: Redis) -> None:  # fmt: skip
    store = RedisStateStore(redis_server.url, ttl_seconds=60)
    try:
        await raw_redis.set(key("wrong-type"), b"a plain string")
        with pytest.raises(StoreUnavailableError, match="WRONGTYPE"):
            await store.get_many([key("wrong-type")])
        assert not store.breaker.is_open
        assert await store.get_many([key("fine")]) == [None]
    finally:
        await store.close()


async def test_redis_unreachable_fails_fast_then_recovers() -> None:
    port = free_port()  # nothing listens there
    store = RedisStateStore(f"redis://127.0.0.1:{port}/0", ttl_seconds=60, breaker_cooldown_s=0.3)
    try:
        started = time.perf_counter()
        with pytest.raises(StoreUnavailableError):
            await store.get_many([key("s")])
        assert time.perf_counter() - started < 1.0
        for call in (store.get_many([key("s")]), store.compare_and_set(key("s"), 0, StoredRecord(1, b"x")), store.count()):  # fmt: skip
            started = time.perf_counter()
            with pytest.raises(StoreUnavailableError, match="circuit open"):
                await call
            assert time.perf_counter() - started < 0.05
        assert not await store.ping()

        server = RedisServer(find_redis_server() or pytest.skip("no redis-server"), port)
        server.start()
        try:
            assert await _eventually_ok(store.ping, within_s=5.0)
            assert await store.compare_and_set(key("s"), 0, StoredRecord(1, b"x"))
            assert await store.get_many([key("s")]) == [StoredRecord(1, b"x")]
        finally:
            server.close()
    finally:
        await store.close()


async def test_redis_outage_and_restart_on_the_same_port(redis_server: RedisServer) -> None:
    store = RedisStateStore(redis_server.url, ttl_seconds=60, breaker_cooldown_s=0.3)
    try:
        assert await store.compare_and_set(key("s"), 0, StoredRecord(1, b"x"))
        redis_server.stop()
        started = time.perf_counter()
        for _ in range(20):
            with pytest.raises(StoreUnavailableError):
                await store.get_many([key("s")])
        assert time.perf_counter() - started < 1.0
        redis_server.start()  # empty: no persistence
        assert await _eventually_ok(store.ping, within_s=5.0)
        assert await store.get_many([key("s")]) == [None]
        assert await store.compare_and_set(key("s"), 0, StoredRecord(1, b"again"))
    finally:
        await store.close()


async def test_redis_hang_times_out_quickly(redis_server: RedisServer) -> None:
    store = RedisStateStore(redis_server.url, ttl_seconds=60, socket_timeout_s=0.3, breaker_cooldown_s=0.2)  # fmt: skip
    try:
        assert await store.compare_and_set(key("s"), 0, StoredRecord(1, b"x"))
        redis_server.pause()  # SIGSTOP: the socket stays open, answers never come
        try:
            started = time.perf_counter()
            with pytest.raises(StoreUnavailableError):
                await store.get_many([key("s")])
            assert time.perf_counter() - started < 1.5
        finally:
            redis_server.resume()
        assert await _eventually_ok(store.ping, within_s=5.0)
        assert await store.get_many([key("s")]) == [StoredRecord(1, b"x")]
    finally:
        await store.close()


def test_circuit_breaker_refuses_during_cooldown_then_lets_one_probe_through() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(cooldown_s=0.5, clock=clock)
    assert breaker.before_call()
    assert breaker.before_call()  # closed: every call passes
    breaker.record_failure()
    assert not breaker.before_call()
    clock.now += 0.6
    assert breaker.before_call()  # the probe
    assert not breaker.before_call()  # others fail fast while it is out
    breaker.record_failure()
    assert not breaker.before_call()
    clock.now += 0.6
    assert breaker.before_call()
    breaker.record_success()
    assert not breaker.is_open
    assert breaker.before_call()
    assert breaker.before_call()


def test_redis_store_rejects_bad_settings() -> None:
    with pytest.raises(ValueError, match="ttl_seconds"):
        RedisStateStore("redis://127.0.0.1:1/0", ttl_seconds=0)
    with pytest.raises(ValueError, match="count_method"):
        RedisStateStore("redis://127.0.0.1:1/0", ttl_seconds=None, count_method="keys")  # type: ignore[arg-type]


async def _eventually_ok(check: Callable[[], Awaitable[bool]], within_s: float) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if await check():
            return True
        await asyncio.sleep(0.05)
    return False
