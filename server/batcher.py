"""Cross-stream dynamic batching: one loop groups queued jobs into forward passes.

Jobs of any streams wait at most `max_wait_s` after the first one arrives, and a batch
holds at most `max_batch_images` images (a single larger job forms a batch alone).
The queue is bounded in images: past `max_queue_images` a submit fails with `OverloadedError`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ttaserve.server.errors import OverloadedError

log = logging.getLogger(__name__)


@dataclass
class PredictJob:
    """One predict request: a stream's images waiting for a forward pass."""

    stream_id: str
    requested_policy: str | None
    pixels: torch.Tensor  # (n, C, H, W) normalized model input
    group: str = "default"
    top_k: int = 5
    future: asyncio.Future[Any] = field(default_factory=lambda: asyncio.get_running_loop().create_future())  # fmt: skip
    enqueued_at: float = field(default_factory=time.perf_counter)

    @property
    def size(self) -> int:
        return int(self.pixels.shape[0])


BatchHandler = Callable[[list[PredictJob]], Awaitable[None]]


class CrossStreamBatcher:
    """Collects jobs from every stream into batches and hands them to `handler` in order."""

    def __init__(
        self,
        handler: BatchHandler,
        max_batch_images: int,
        max_wait_s: float,
        max_queue_images: int,
    ) -> None:
        self._handler = handler
        self._max_batch = max_batch_images
        self._max_wait = max_wait_s
        self._max_queue = max_queue_images
        self._queue: asyncio.Queue[PredictJob] = asyncio.Queue()
        self._queued_images = 0
        self._task: asyncio.Task[None] | None = None
        self._carry: PredictJob | None = None

    @property
    def queued_images(self) -> int:
        return self._queued_images

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="ttaserve-batcher")

    async def submit(self, job: PredictJob) -> Any:
        """Queue a job and wait for its outcome (raises what the handler set on it)."""
        if self._task is None:
            raise RuntimeError("batcher is not running")
        if self._queued_images + job.size > self._max_queue and self._queued_images > 0:
            raise OverloadedError(retry_after_s=max(1.0, self._max_wait))
        self._queued_images += job.size
        self._queue.put_nowait(job)
        return await job.future

    async def drain(self, timeout_s: float) -> None:
        """Wait until every queued job was handled (or the timeout passed)."""
        deadline = time.monotonic() + timeout_s
        while (self._queued_images > 0) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _next_batch(self) -> list[PredictJob]:
        first = self._carry or await self._queue.get()
        self._carry = None
        batch, images = [first], first.size
        deadline = time.perf_counter() + self._max_wait
        while images < self._max_batch:
            remaining = deadline - time.perf_counter()
            try:
                job = self._queue.get_nowait() if remaining <= 0 else await asyncio.wait_for(self._queue.get(), remaining)  # fmt: skip
            except (TimeoutError, asyncio.QueueEmpty):
                break
            if images + job.size > self._max_batch:
                self._carry = job  # starts the next batch
                break
            batch.append(job)
            images += job.size
        return batch

    async def _run(self) -> None:
        while True:
            batch = await self._next_batch()
            try:
                await self._handler(batch)
            except Exception as exc:  # the handler answers jobs itself; this is a last resort
                log.exception("batch handler failed")
                for job in batch:
                    if not job.future.done():
                        job.future.set_exception(exc)
            finally:
                self._queued_images -= sum(job.size for job in batch)
