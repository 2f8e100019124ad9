"""Replays a labelled stream through the server's own dataplane, in process.

Each stream gets a fresh `DataPlane` over an in-process store, so it starts from the
source model, and every request goes through `DataPlane.process_batch` exactly as the
batcher would hand it over: one stream, one request per batch, answered in order.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ttaserve.bench.scenarios import Stream
from ttaserve.server.batcher import PredictJob
from ttaserve.server.dataplane import DataPlane, PredictOutcome
from ttaserve.server.decoding import images_to_tensor
from ttaserve.server.metrics import ServerMetrics
from ttaserve.server.model_runner import ModelRunner
from ttaserve.server.stores.memory import InMemoryStateStore


@dataclass(frozen=True)
class StreamImages:
    """The pixels a stream indexes: (domains, N, H, W, C) known, (domains, M, ...) unknown."""

    known: np.ndarray
    unknown: np.ndarray | None = None

    def gather(self, stream: Stream, rows: slice) -> np.ndarray:
        """uint8 (n, H, W, C) images of one request."""
        domain, index, unknown = stream.domain[rows], stream.index[rows], stream.unknown[rows]
        if not unknown.any():
            return self.known[domain, index]
        if self.unknown is None:
            raise ValueError("the stream has open-set samples but no open-set pool was given")
        out = np.empty((len(index), *self.known.shape[2:]), dtype=np.uint8)
        out[~unknown] = self.known[domain[~unknown], index[~unknown]]
        out[unknown] = self.unknown[domain[unknown], index[unknown]]
        return out


@dataclass(frozen=True)
class StreamOutcome:
    """What the server answered for every sample of a stream."""

    predicted: np.ndarray  # (n,) top-1 label
    open_set_score: np.ndarray  # (n,) higher = more likely unknown
    resets: int  # answers that reported a collapse-guard reset of the stream
    seconds: float


def _was_reset(outcome: PredictOutcome) -> bool:
    adaptation = getattr(outcome, "adaptation", None)  # richer outcomes nest it
    return bool(getattr(adaptation, "reset", getattr(outcome, "reset", False)))


async def replay_stream(
    runner: ModelRunner,
    policy: str,
    stream: Stream,
    images: StreamImages,
    progress: Callable[[int], None] | None = None,
) -> StreamOutcome:
    """Send `stream` request by request to a fresh dataplane running `policy`."""
    spec = runner.model.card.input
    mean, std = tuple(spec.mean), tuple(spec.std)
    dataplane = DataPlane(runner, InMemoryStateStore(), ServerMetrics(), default_policy=policy)
    predicted = np.empty(len(stream), dtype=np.int64)
    score = np.empty(len(stream), dtype=np.float64)
    resets = 0
    started = time.perf_counter()
    try:
        for rows in stream.requests():
            pixels = images_to_tensor(images.gather(stream, rows), mean, std)
            job = PredictJob(stream_id="bench", requested_policy=policy, pixels=pixels, top_k=1)
            await dataplane.process_batch([job])
            outcome: PredictOutcome = job.future.result()
            predicted[rows] = [p.label for p in outcome.predictions]
            score[rows] = [p.open_set_score for p in outcome.predictions]
            resets += _was_reset(outcome)
            if progress:
                progress(rows.stop - rows.start)
    finally:
        dataplane.close()
    return StreamOutcome(predicted, score, resets, time.perf_counter() - started)
