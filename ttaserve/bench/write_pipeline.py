"""Probe: do pipelined batches (`TTASERVE_WRITES_IN_FLIGHT`) raise throughput here?

Drives the server's batcher and dataplane in process (no HTTP) with `--streams` closed-loop
streams of `--images` images each, against a local Redis whose round trips are lengthened
by `--delays-ms` (an `asyncio.sleep` before each store call: what a network adds while
the event loop is free), and prints images/s with each batch's writes finished before the
next batch (0) and pipelined (`--writes`), side by side in each round:

    python -m ttaserve.bench.write_pipeline --streams 64 --images 32 --delays-ms 0,2

Pipelining can win at most the writes' share of a batch's time: on a GPU, where a full
batch's forward pass takes a few milliseconds, that is large; on a CPU, where it takes
~100 ms, a few percent.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from prometheus_client import CollectorRegistry

from ttaserve.clients.bench_serve import load_images, redis_process
from ttaserve.datasets import default_cifar10_dir
from ttaserve.server.batcher import CrossStreamBatcher, PredictJob
from ttaserve.server.dataplane import DataPlane
from ttaserve.server.decoding import images_to_tensor
from ttaserve.server.metrics import ServerMetrics
from ttaserve.server.model_package import load_package
from ttaserve.server.model_runner import ModelRunner
from ttaserve.server.settings import Settings, bundled_model_path
from ttaserve.server.stores.base import StoredRecord
from ttaserve.server.stores.redis import RedisStateStore


class DelayedRedisStore(RedisStateStore):
    """The Redis store with `delay_s` added to every round trip."""

    delay_s = 0.0

    async def get_many(self, keys: Sequence[str]) -> list[StoredRecord | None]:
        await asyncio.sleep(self.delay_s)
        return await super().get_many(keys)

    async def compare_and_set(self, key: str, expected_version: int, record: StoredRecord) -> bool:  # fmt: skip
        await asyncio.sleep(self.delay_s)
        return await super().compare_and_set(key, expected_version, record)


async def throughput(runner: ModelRunner, url: str, pixels: torch.Tensor, args: argparse.Namespace, writes: int, delay_s: float, tag: str) -> float:  # fmt: skip
    """Images/s of `args.streams` closed-loop streams over `args.seconds` (after a warm-up)."""
    settings = Settings()
    store = DelayedRedisStore(url, ttl_seconds=3600)
    store.delay_s = delay_s
    dataplane = DataPlane(runner, store, ServerMetrics(CollectorRegistry()), args.policy, single_thread_below_images=settings.single_thread_below_images, forward_threads=args.threads, writes_in_flight=writes)  # fmt: skip
    batcher = CrossStreamBatcher(dataplane.begin_batch, max_batch_images=settings.max_batch_size, max_wait_s=settings.max_batch_wait_ms / 1000, max_queue_images=1 << 20, max_gather_s=settings.max_batch_gather_ms / 1000)  # fmt: skip
    batcher.start()
    counted, measuring, stopping = [0], [False], [False]

    async def stream(i: int) -> None:
        k = 0
        while not stopping[0]:
            start = (k * args.images) % (len(pixels) - args.images + 1)
            await batcher.submit(PredictJob(f"{tag}-{i}", None, pixels[start : start + args.images]))  # fmt: skip
            k += 1
            if measuring[0]:
                counted[0] += args.images

    streams = [asyncio.create_task(stream(i)) for i in range(args.streams)]
    await asyncio.sleep(args.warmup_s)
    measuring[0], started = True, time.perf_counter()
    await asyncio.sleep(args.seconds)
    rate = counted[0] / (time.perf_counter() - started)
    stopping[0] = True
    await asyncio.gather(*streams)
    await batcher.stop()
    await dataplane.flush()
    dataplane.close()
    await store.close()
    return rate


async def probe(args: argparse.Namespace, url: str) -> None:
    torch.set_num_threads(args.threads)
    runner = ModelRunner(load_package(args.model))
    images, _ = load_images(args.data or default_cifar10_dir() / "test.npz")  # random if absent
    spec = runner.model.card.input
    pixels = images_to_tensor(images, tuple(spec.mean), tuple(spec.std))  # as requests decode
    delays = [float(d) / 1000 for d in args.delays_ms.split(",")]
    rates: dict[tuple[float, int], list[float]] = {}
    for r in range(args.rounds):
        for delay in delays:
            for writes in (0, args.writes) if r % 2 == 0 else (args.writes, 0):
                rate = await throughput(runner, url, pixels, args, writes, delay, f"r{r}-{delay}-{writes}")  # fmt: skip
                rates.setdefault((delay, writes), []).append(rate)
                print(f"round {r}: round trip +{delay * 1e3:.1f} ms, writes in flight {writes}: {rate:.0f} images/s", flush=True)  # fmt: skip
    print(f"\n{args.streams} streams x {args.images} images, policy {args.policy}, {args.threads} threads")  # fmt: skip
    print("| added round trip | serial img/s | pipelined img/s | pipelined / serial, per round | median |")  # fmt: skip
    print("|---|---|---|---|---|")
    for delay in delays:
        serial, pipelined = rates[(delay, 0)], rates[(delay, args.writes)]
        ratios = [p / s for p, s in zip(pipelined, serial, strict=True)]
        print(f"| {delay * 1e3:.1f} ms | {statistics.median(serial):.0f} | {statistics.median(pipelined):.0f} | {' / '.join(f'{x:.2f}' for x in ratios)} | {statistics.median(ratios):.2f} |")  # fmt: skip


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=str(bundled_model_path()))
    parser.add_argument("--data", type=Path, default=None, help="npz with uint8 x (default: CIFAR-10 test.npz beside the repository; random pixels without it)")  # fmt: skip
    parser.add_argument("--policy", default="bn")
    parser.add_argument("--streams", type=int, default=64)
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--delays-ms", default="0,2", help="added to each store round trip")
    parser.add_argument("--writes", type=int, default=4, help="writes in flight when pipelined")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--warmup-s", type=float, default=2.0)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as logs, redis_process(Path(logs)) as (_, url):
        asyncio.run(probe(args, url))


if __name__ == "__main__":
    main()
