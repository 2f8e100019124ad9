"""A server backed by Redis keeps answering through a Redis outage (degraded), recovers by
itself when Redis returns, and finds its streams again after a server restart."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
from redis_server import RedisServer

from conftest import png_bytes, random_images, running_server
from ttaserve.server.model_package import LoadedModel
from ttaserve.server.settings import Settings

STREAM = "cam-1"
PNGS = [png_bytes(a) for a in random_images(16, seed=3)]


@dataclass
class Answer:
    sent_at: float
    latency_s: float
    status: int
    degraded: bool | None
    samples_seen: int | None


async def predict(client: httpx.AsyncClient, base: str, i: int, n_images: int = 1) -> Answer:
    sent = time.monotonic()
    pngs = [PNGS[(i + j) % len(PNGS)] for j in range(n_images)]
    response = await client.post(f"{base}/v1/streams/{STREAM}/predict", files=[("images", p) for p in pngs])  # fmt: skip
    adaptation = response.json().get("adaptation", {}) if response.status_code == 200 else {}
    return Answer(sent, time.monotonic() - sent, response.status_code, adaptation.get("degraded"), adaptation.get("samples_seen"))  # fmt: skip


async def wait_for(condition, timeout_s: float) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        await asyncio.sleep(0.02)
    return False


def settings_for(package: Path, redis: RedisServer) -> Settings:
    return Settings(model=package, redis_url=redis.url, max_batch_wait_ms=1.0)


async def test_outage_degrades_then_recovers_without_restart(
    random_package: Path, random_model: LoadedModel, redis_server: RedisServer
) -> None:
    answers: list[Answer] = []
    stop_traffic = asyncio.Event()
    with running_server(settings_for(random_package, redis_server), random_model) as server:
        async with httpx.AsyncClient(timeout=30.0) as client:

            async def traffic(worker: int) -> None:
                i = worker
                while not stop_traffic.is_set():
                    answers.append(await predict(client, server.url, i))
                    i += 2

            workers = [asyncio.create_task(traffic(w)) for w in range(2)]
            try:
                assert await wait_for(lambda: len(answers) >= 6, 30)
                redis_server.stop()
                stopped_at = time.monotonic()
                assert await wait_for(lambda: sum(a.sent_at > stopped_at for a in answers) >= 8, 30)  # fmt: skip
                redis_server.start()  # same port, empty (no persistence)
                started_at = time.monotonic()

                def recovered() -> bool:
                    return any(a.sent_at > started_at and a.degraded is False for a in answers)

                assert await wait_for(recovered, 5.0), "still degraded 5 s after Redis returned"
            finally:
                stop_traffic.set()
                await asyncio.gather(*workers)

            assert all(a.status == 200 for a in answers), [a.status for a in answers]
            before = [a for a in answers if a.sent_at + a.latency_s < stopped_at]  # answered before
            # sent and answered while Redis was down (one answered after the restart may be fresh)
            during = [a for a in answers if stopped_at < a.sent_at and a.sent_at + a.latency_s < started_at]  # fmt: skip
            assert before
            assert not any(a.degraded for a in before)
            assert during
            assert all(a.degraded for a in during)
            assert max(a.latency_s for a in during) < 1.0  # the outage costs no waiting

            # state is written again: sequential requests see samples_seen grow
            after = [await predict(client, server.url, i, n_images=2) for i in range(3)]
            assert [a.degraded for a in after] == [False] * 3
            seen = [a.samples_seen for a in after]
            assert seen[0] is not None
            assert seen == [seen[0], seen[0] + 2, seen[0] + 4]
            summary = (await client.get(f"{server.url}/v1/streams/{STREAM}")).json()
            assert summary["samples_seen"] == seen[-1]


async def test_hung_redis_answers_degraded_within_the_socket_timeout(
    random_package: Path, random_model: LoadedModel, redis_server: RedisServer
) -> None:
    with running_server(settings_for(random_package, redis_server), random_model) as server:
        async with httpx.AsyncClient(timeout=30.0) as client:
            assert (await predict(client, server.url, 0)).degraded is False
            redis_server.pause()  # SIGSTOP: connections hang instead of being refused
            try:
                hung = [await predict(client, server.url, i) for i in range(4)]
            finally:
                redis_server.resume()
            assert [(a.status, a.degraded) for a in hung] == [(200, True)] * 4
            assert max(a.latency_s for a in hung) < 2.0

            async def undegraded() -> bool:
                return (await predict(client, server.url, 0)).degraded is False

            deadline = time.monotonic() + 5.0
            while not await undegraded():
                assert time.monotonic() < deadline, "still degraded 5 s after Redis resumed"
                await asyncio.sleep(0.05)


async def test_stream_state_survives_a_server_restart(
    random_package: Path, random_model: LoadedModel, redis_server: RedisServer
) -> None:
    settings = settings_for(random_package, redis_server)
    with running_server(settings, random_model) as first:
        async with httpx.AsyncClient(timeout=30.0) as client:
            answers = [await predict(client, first.url, i, n_images=i + 1) for i in range(3)]
            assert not any(a.degraded for a in answers)
            before = (await client.get(f"{first.url}/v1/streams/{STREAM}")).json()
    assert (before["samples_seen"], before["updates"]) == (6, 3)

    with running_server(settings, random_model) as second:
        async with httpx.AsyncClient(timeout=30.0) as client:
            response = await client.get(f"{second.url}/v1/streams/{STREAM}")
            assert response.status_code == 200, response.text
            assert response.json() == before
            after = await predict(client, second.url, 0)
            assert (after.degraded, after.samples_seen) == (False, 7)
