"""Redis state store: shared stream states for several server replicas.

Layout: one Redis hash per stream key (the dataplane's `ttaserve:<model>:{<stream>}`; the
hash tag keeps a stream in one Cluster slot) with two fields, `v` (the version, a decimal
integer) and `d` (the state blob, raw bytes). Reads of a batch are one pipelined round
trip of HMGETs; writes are one Lua compare-and-set that also sets the TTL.

Failures never hang a request: sockets have short connect/read timeouts, redis-py's own
retries are off, every Redis or socket error surfaces as `StoreUnavailableError`, and a
small circuit breaker fails calls at once for `breaker_cooldown_s` after an outage is seen,
then lets one probe through; the pool reconnects by itself when Redis is back.
"""

from __future__ import annotations

import asyncio
import math
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Literal, TypeVar

from redis import exceptions as rex
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from ttaserve.server.stores.base import StoredRecord, StoreUnavailableError

T = TypeVar("T")
_GLOB_SPECIAL = re.compile(r"[\\*?\[\]]")  # escaped in the SCAN MATCH pattern

# KEYS[1]: stream key. ARGV: expected version (0 = absent), new version, blob, TTL in ms
# (0 = no expiry). Returns 1 when written, 0 on a version conflict.
CAS_SCRIPT = """
local current = redis.call('HGET', KEYS[1], 'v')
if (current and tonumber(current) or 0) ~= tonumber(ARGV[1]) then
  return 0
end
redis.call('HSET', KEYS[1], 'v', ARGV[2], 'd', ARGV[3])
local ttl = tonumber(ARGV[4])
if ttl > 0 then
  redis.call('PEXPIRE', KEYS[1], ttl)
else
  redis.call('PERSIST', KEYS[1])
end
return 1
"""

# Errors that mean "Redis is not serving now": they open the circuit breaker.
# (redis-py's ConnectionError covers BusyLoadingError, MaxConnectionsError, auth errors.)
_OUTAGE_ERRORS: tuple[type[BaseException], ...] = (
    rex.ConnectionError,
    rex.TimeoutError,
    rex.ReadOnlyError,
    rex.OutOfMemoryError,
    rex.ClusterDownError,
    rex.TryAgainError,
    asyncio.TimeoutError,
    OSError,
)


class CircuitBreaker:
    """Fails fast for `cooldown_s` after a failure, then lets one probe call through.

    Closed: calls pass. Open (after a failure): calls are refused until the cooldown ends.
    Then one call at a time probes; its success closes the breaker, its failure reopens it.
    """

    def __init__(self, cooldown_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        if cooldown_s < 0:
            raise ValueError("breaker cooldown must be >= 0 seconds")
        self.cooldown_s = cooldown_s
        self._clock = clock
        self._open_until: float | None = None  # None: closed
        self._probing = False

    @property
    def is_open(self) -> bool:
        return self._open_until is not None

    def before_call(self) -> bool:
        """Whether a call may go ahead now; True marks it as the probe when half-open."""
        if self._open_until is None:
            return True
        if self._probing or self._clock() < self._open_until:
            return False
        self._probing = True
        return True

    def record_success(self) -> None:
        self._open_until, self._probing = None, False

    def record_failure(self) -> None:
        self._open_until, self._probing = self._clock() + self.cooldown_s, False


class RedisStateStore:
    """`StateStore` on one Redis (or a Redis-compatible server) shared by all replicas."""

    def __init__(
        self,
        url: str,
        ttl_seconds: float | None = 7 * 24 * 3600,
        *,
        key_prefix: str = "ttaserve:",
        connect_timeout_s: float = 0.25,
        socket_timeout_s: float = 0.5,
        breaker_cooldown_s: float = 0.5,
        max_connections: int = 64,
        count_method: Literal["scan", "dbsize"] = "scan",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """Connect lazily to `url` (redis://, rediss:// or unix://).

        `key_prefix` is what `count()` scans for; `count_method="dbsize"` counts every key of
        the database instead (O(1), right only when the database holds nothing else).
        """
        if ttl_seconds is not None and ttl_seconds <= 0:
            raise ValueError("ttl_seconds must be > 0, or None for no expiry")
        if count_method not in ("scan", "dbsize"):
            raise ValueError(f"count_method must be 'scan' or 'dbsize', not {count_method!r}")
        self._ttl_ms = 0 if ttl_seconds is None else max(1, math.ceil(ttl_seconds * 1000))
        self._prefix = key_prefix
        self._count_method = count_method
        self.breaker = CircuitBreaker(breaker_cooldown_s, clock)
        pool = BlockingConnectionPool.from_url(
            url,
            max_connections=max_connections,
            timeout=connect_timeout_s + socket_timeout_s,  # wait for a free pooled connection
            socket_connect_timeout=connect_timeout_s,
            socket_timeout=socket_timeout_s,
            retry=Retry(NoBackoff(), 0),  # never retry inside redis-py: the breaker decides
            retry_on_timeout=False,
        )
        self._redis = Redis(connection_pool=pool)
        self._cas = self._redis.register_script(CAS_SCRIPT)  # EVALSHA, loads on NOSCRIPT

    async def _call(self, operation: str, fn: Callable[[], Awaitable[T]]) -> T:
        """Run one Redis operation behind the breaker, mapping failures to StoreUnavailable."""
        if not self.breaker.before_call():
            raise StoreUnavailableError(f"redis {operation}: unavailable (circuit open)")
        try:
            result = await fn()
        except _OUTAGE_ERRORS as exc:
            self.breaker.record_failure()
            raise StoreUnavailableError(f"redis {operation}: {type(exc).__name__}: {exc}") from exc
        except rex.RedisError as exc:  # e.g. WRONGTYPE: the server answers, so no outage
            self.breaker.record_success()
            raise StoreUnavailableError(f"redis {operation}: {type(exc).__name__}: {exc}") from exc
        except BaseException:  # cancelled mid-call: let a later call probe again
            if self.breaker.is_open:
                self.breaker.record_failure()
            raise
        self.breaker.record_success()
        return result

    async def get_many(self, keys: Sequence[str]) -> list[StoredRecord | None]:
        """One pipelined round trip of `HMGET key v d` per key."""
        if not keys:
            return []

        async def read() -> list[list[bytes | None]]:
            async with self._redis.pipeline(transaction=False) as pipe:
                for key in keys:
                    pipe.hmget(key, "v", "d")
                return await pipe.execute()

        rows = await self._call("get", read)
        return [
            None if version is None or data is None else StoredRecord(int(version), bytes(data))
            for version, data in rows
        ]

    async def compare_and_set(self, key: str, expected_version: int, record: StoredRecord) -> bool:
        """Atomic (Lua) write of `record` if the stored version is `expected_version`."""
        args = [expected_version, record.version, record.data, self._ttl_ms]
        written = await self._call("cas", lambda: self._cas(keys=[key], args=args))
        return bool(written)

    async def delete(self, key: str) -> bool:
        return bool(await self._call("delete", lambda: self._redis.delete(key)))

    async def count(self) -> int:
        """Live records: SCAN of `key_prefix*` (O(keys in the database), in pages of 1000
        keys, so one round trip per page), or DBSIZE when `count_method="dbsize"`."""
        if self._count_method == "dbsize":
            return int(await self._call("count", self._redis.dbsize))

        pattern = _GLOB_SPECIAL.sub(r"\\\g<0>", self._prefix) + "*"

        async def scan() -> int:
            total, cursor = 0, 0
            while True:
                cursor, keys = await self._redis.scan(cursor, match=pattern, count=1000)
                total += len(keys)
                if cursor == 0:
                    return total

        return await self._call("count", scan)

    async def ping(self) -> bool:
        """True when Redis answers PING (False while the breaker is open)."""
        try:
            return bool(await self._call("ping", self._redis.ping))
        except StoreUnavailableError:
            return False

    async def close(self) -> None:
        await self._redis.aclose(close_connection_pool=True)
