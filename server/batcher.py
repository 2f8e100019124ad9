"""Cross-stream dynamic batching: one loop groups queued jobs into forward passes.

A batch holds at most `max_batch_images` images (a single larger job forms a batch alone).
While one batch is processed, jobs queue up; the next batch takes what is queued and then
waits for more only while that is likely to pay:

- when every active stream already has a job in the batch, no more are expected: the
  batch goes at once (one stream sending one request at a time never waits). A stream is
  active while its last submit is more recent than twice its usual interval between
  submits (at most `active_window_s`; a stream seen once, for `max_gather_s`);
- otherwise it waits for the missing streams' jobs as long as they keep arriving: each
  wait for the next job is at most max(`max_wait_s`, 4x the recent gap between
  arrivals), and the whole gathering at most `max_gather_s`.

This is Triton's "preferred batch size within max_queue_delay", with the preferred size
set by the number of active streams instead of a constant: many concurrent streams
fill large batches (the per-image cost of a forward pass falls with its size) without
delaying a lone stream.
The queue is bounded in images: past `max_queue_images` a submit fails with `OverloadedError`.

A handler may return an awaitable for its batch's last stage (the dataplane's state
writes and answers). The next batch starts before that stage ends only when a full batch
is already queued: then the forward thread is the bottleneck, and the writes' store round
trips would idle it. Otherwise the batcher waits for the answers, so that their streams'
next requests can join the next batch (starting early there made batches of 64
single-image streams half as large and their images 1.5x slower in the model).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
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


BatchHandler = Callable[[list[PredictJob]], Awaitable[Any]]  # may return its last stage (above)


class CrossStreamBatcher:
    """Collects jobs from every stream into batches and hands them to `handler` in order."""

    def __init__(
        self,
        handler: BatchHandler,
        max_batch_images: int,
        max_wait_s: float,
        max_queue_images: int,
        max_gather_s: float = 0.0,
        active_window_s: float = 2.0,
    ) -> None:
        self._handler = handler
        self._max_batch = max_batch_images
        self._max_wait = max_wait_s
        self._max_gather = max(max_gather_s, max_wait_s)
        self._max_queue = max_queue_images
        self._window = active_window_s
        self._queue: asyncio.Queue[PredictJob] = asyncio.Queue()
        self._queued_images = 0
        self._task: asyncio.Task[None] | None = None
        self._carry: PredictJob | None = None
        # stream -> (last submit time, EMA of its interval between submits), oldest first
        self._active: OrderedDict[str, tuple[float, float | None]] = OrderedDict()
        self._last_submit: float | None = None
        self._gap = max_wait_s  # EMA of the time between submits

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
        self._note_arrival(job)
        self._queued_images += job.size
        self._queue.put_nowait(job)
        return await job.future

    def _note_arrival(self, job: PredictJob) -> None:
        now = job.enqueued_at
        if self._last_submit is not None:
            gap = min(max(now - self._last_submit, 0.0), self._max_gather)
            self._gap = 0.8 * self._gap + 0.2 * gap
        self._last_submit = now
        last, interval = self._active.pop(job.stream_id, (None, None))
        if last is not None:
            gap = min(now - last, self._window)
            interval = gap if interval is None else 0.5 * interval + 0.5 * gap
        self._active[job.stream_id] = (now, interval)

    def active_streams(self, now: float) -> set[str]:
        """Streams expected to submit again soon (see the module docstring)."""
        while self._active:
            stream, (last, _) = next(iter(self._active.items()))
            if now - last <= self._window:
                break
            del self._active[stream]
        return {
            stream
            for stream, (last, interval) in self._active.items()
            if now - last <= (self._max_gather if interval is None else 2 * interval)
        }

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
        started = time.perf_counter()
        missing = self.active_streams(started) - {first.stream_id}
        while images < self._max_batch:
            if self._queue.empty():
                now = time.perf_counter()
                if not missing:
                    break  # every active stream is in the batch: nothing more to wait for
                timeout = min(max(self._max_wait, 4 * self._gap), started + self._max_gather - now)  # fmt: skip
                if timeout <= 0:
                    break
                try:
                    job = await asyncio.wait_for(self._queue.get(), timeout)
                except TimeoutError:
                    break
            else:
                job = self._queue.get_nowait()
            if images + job.size > self._max_batch:
                self._carry = job  # starts the next batch
                break
            batch.append(job)
            images += job.size
            missing.discard(job.stream_id)
        return batch

    async def _run(self) -> None:
        while True:
            batch = await self._next_batch()
            rest: Awaitable[Any] | None = None
            try:
                rest = await self._handler(batch)
            except Exception as exc:  # the handler answers jobs itself; this is a last resort
                log.exception("batch handler failed")
                for job in batch:
                    if not job.future.done():
                        job.future.set_exception(exc)
            finally:
                self._queued_images -= sum(job.size for job in batch)
            # not saturated: answer first, so that those streams can join the next batch
            # (shielded: stopping the batcher must not cancel writes; the dataplane's
            # `flush` waits for them)
            if isinstance(rest, Awaitable) and self._queued_images < self._max_batch:
                await asyncio.shield(rest)
