"""Three server processes share one Redis: one stream's requests spread over all of them
lose no update (compare-and-set across replicas)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from redis_server import RedisServer

from conftest import free_port, make_random_package, png_bytes, random_images

REPLICAS = 3
REQUESTS = 60
STREAM = "shared-camera"


class ServerProcess:
    """`python -m ttaserve serve` in a child process; its output goes to a log file."""

    def __init__(self, package: Path, redis_url: str, log_path: Path, extra_env: dict[str, str] | None = None) -> None:  # fmt: skip
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        env = (
            os.environ
            | {
                "TTASERVE_MODEL": str(package),
                "TTASERVE_REDIS_URL": redis_url,
                "TTASERVE_TORCH_THREADS": "1",
                "TTASERVE_MAX_BATCH_WAIT_MS": "2",
                "TTASERVE_LOG_LEVEL": "warning",
            }
            | (extra_env or {})
        )
        with log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "ttaserve", "serve", "--port", str(self.port)],
                env=env, stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip

    def log_tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]

    def wait_ready(self, deadline: float) -> None:
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"server on port {self.port} exited:\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.url}/v2/health/ready", timeout=1.0).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        pytest.fail(f"server on port {self.port} not ready in time:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)


@pytest.fixture
def replicas(tmp_path: Path, redis_server: RedisServer) -> Iterator[list[ServerProcess]]:
    package = make_random_package(tmp_path / "tiny-test")
    servers: list[ServerProcess] = []
    try:
        for i in range(REPLICAS):
            # One replica pipelines its batches' writes, in batches of at most 3 images (one
            # request), so that its queue is saturated and the stream's next batch is read
            # while the previous one writes: the read must wait for that write.
            pipelined = {"TTASERVE_WRITES_IN_FLIGHT": "4", "TTASERVE_MAX_BATCH_SIZE": "3"}
            log = tmp_path / f"server{i}.log"
            servers.append(ServerProcess(package, redis_server.url, log, pipelined if i == 1 else None))  # fmt: skip
        deadline = time.monotonic() + 120
        for s in servers:
            s.wait_ready(deadline)
        yield servers
    finally:
        for s in servers:
            s.stop()


async def test_one_stream_over_three_replicas_loses_no_update(replicas: list[ServerProcess]) -> None:  # fmt: skip
    sizes = np.random.default_rng(0).integers(1, 4, REQUESTS).tolist()  # 1-3 images each
    images = [png_bytes(a) for a in random_images(sum(sizes), seed=1)]
    requests, offset = [], 0
    for size in sizes:
        requests.append(images[offset : offset + size])
        offset += size

    async with httpx.AsyncClient(timeout=60.0) as client:

        async def predict(i: int, pngs: list[bytes]) -> dict:
            url = f"{replicas[i % REPLICAS].url}/v1/streams/{STREAM}/predict"
            response = await client.post(url, files=[("images", png) for png in pngs])
            assert response.status_code == 200, response.text
            return response.json()

        answers = await asyncio.gather(*(predict(i, pngs) for i, pngs in enumerate(requests)))
        summaries = [(await client.get(f"{s.url}/v1/streams/{STREAM}")).json() for s in replicas]

    assert [len(a["predictions"]) for a in answers] == sizes
    assert not any(a["adaptation"]["degraded"] for a in answers)
    assert summaries[0] == summaries[1] == summaries[2]  # one shared state, read from any server
    assert summaries[0]["samples_seen"] == sum(sizes)
    assert summaries[0]["updates"] == REQUESTS
    assert summaries[0]["state_version"] >= max(a["adaptation"]["state_version"] for a in answers)
