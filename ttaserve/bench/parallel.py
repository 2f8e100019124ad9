"""Replaying the accuracy benchmark's policies in worker processes (`--jobs N`).

Each worker process (spawned, so no forked torch thread pools) loads the model and
rebuilds the same stream plans from the configuration (corruptions come from the cache
the parent filled), then replays whole policies; the parent only gathers the answers.
Results are identical to a serial run: every stream starts from a fresh dataplane and the
plans are seeded. `--variant` policies are registered in every worker from the
configuration; other policies registered at run time in the parent (not in the registry
module) are unknown to the workers: use one job for those.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from multiprocessing.sharedctypes import Synchronized
from typing import Any

import torch
from tqdm import tqdm

from ttaserve.bench.replay import StreamOutcome, replay_stream
from ttaserve.bench.summary import Run
from ttaserve.server.allocator import tune_glibc_malloc

_WORKER: dict[str, Any] = {}


def _start_worker(cfg: dict[str, Any], threads: int, done: Synchronized) -> None:
    from ttaserve.bench.accuracy import load_inputs, plan_streams, register_variants

    register_variants(cfg["variants"])  # the parent's `--variant` policies
    tune_glibc_malloc()  # as the server does: activations reuse heap memory
    torch.set_num_threads(threads)
    runner, x, y = load_inputs(cfg)
    _WORKER.update(runner=runner, plans=plan_streams(x, y, cfg), done=done)


def _count(n: int) -> None:
    done: Synchronized = _WORKER["done"]
    with done.get_lock():
        done.value += n


def _replay_policy(policy: str) -> list[StreamOutcome]:
    """Every plan of the benchmark for one policy, in plan order (runs in a worker)."""

    async def replay() -> list[StreamOutcome]:
        return [await replay_stream(_WORKER["runner"], policy, plan.stream, plan.images, _count) for plan in _WORKER["plans"]]  # fmt: skip

    return asyncio.run(replay())


def replay_in_workers(cfg: dict[str, Any], plans: list[Any], policies: list[str], jobs: int) -> list[Run]:  # fmt: skip
    """`replay_all` spread over `jobs` processes, one policy at a time each."""
    ctx = mp.get_context("spawn")
    done = ctx.Value("q", 0)
    threads = max(1, cfg["threads"] // jobs)
    total = len(policies) * sum(len(p.stream) for p in plans)
    with (
        ProcessPoolExecutor(
            jobs, mp_context=ctx, initializer=_start_worker, initargs=(cfg, threads, done)
        ) as pool,  # fmt: skip
        tqdm(total=total, desc=f"replaying ({jobs} jobs)", unit="img", smoothing=0.05) as bar,
    ):
        futures = {policy: pool.submit(_replay_policy, policy) for policy in policies}
        pending = set(futures.values())
        while pending:
            finished, pending = wait(pending, timeout=1.0, return_when=FIRST_EXCEPTION)
            for future in finished:
                future.result()  # a worker's exception surfaces here
            bar.update(done.value - bar.n)
    runs = []
    for policy, future in futures.items():
        for plan, outcome in zip(plans, future.result(), strict=True):
            runs.append(Run(policy, plan.scenario, plan.domains, plan.labels, plan.stream, outcome))  # fmt: skip
    return runs
