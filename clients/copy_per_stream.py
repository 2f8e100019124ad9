"""The baseline a user would otherwise build: one `copy.deepcopy` of the model per stream.

A minimal FastAPI server with ttaserve's predict route shape
(`POST /v1/streams/{id}/predict`, same bodies, same decoding) that keeps, per stream, its
own deep copy of the loaded module (with its StreamNorm layers) and adapts it in process
with the same forward-only policy (`bn` by default). Every request runs its own forward
pass on its stream's copy: no cross-stream batching, no state store. It exports the two
metrics the serving benchmark reads (`ttaserve_batch_size_images`,
`ttaserve_forward_duration_seconds`) so both servers are measured the same way.

    python -m ttaserve.clients.copy_per_stream --port 8100 [--model PKG] [--policy bn]

Model and threads also come from TTASERVE_MODEL and TTASERVE_TORCH_THREADS.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram, generate_latest
from starlette.concurrency import run_in_threadpool

from ttaserve.adapters.moments import Segments
from ttaserve.adapters.policy import AdaptationPolicy, Observation, StateTensors
from ttaserve.adapters.registry import build_policy
from ttaserve.adapters.stream_norm import stream_norm_layers
from ttaserve.server.decoding import DecodeLimits, decode_image, images_to_tensor
from ttaserve.server.errors import ApiError
from ttaserve.server.metrics import BATCH_BUCKETS, LATENCY_BUCKETS
from ttaserve.server.model_package import LoadedModel, load_package
from ttaserve.server.model_runner import ModelRunner
from ttaserve.server.request_body import extract_images
from ttaserve.server.settings import bundled_model_path


@dataclass
class StreamCopy:
    """One stream's private model copy and the policy state that adapts it."""

    runner: ModelRunner
    state: StateTensors
    samples_seen: int = 0
    version: int = 0


def copy_model(model: LoadedModel) -> LoadedModel:
    """A deep copy of the served module (weights, buffers, StreamNorm layers)."""
    module = copy.deepcopy(model.module)
    return replace(model, module=module, layers=stream_norm_layers(module))


class CopyPerStreamServer:
    """Streams by id -> their own model copy; one forward thread, one request per forward."""

    def __init__(self, model: LoadedModel, policy: AdaptationPolicy) -> None:
        self.model = model
        self.policy = policy
        self.streams: dict[str, StreamCopy] = {}
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="copy-forward")
        registry = self.registry = CollectorRegistry()
        self.batch_images = Histogram(
            "ttaserve_batch_size_images",
            "Images per forward batch",
            buckets=BATCH_BUCKETS,
            registry=registry,
        )
        self.forward_seconds = Histogram(
            "ttaserve_forward_duration_seconds",
            "Model forward pass time per batch",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )

    def stream(self, stream_id: str) -> StreamCopy:
        if stream_id not in self.streams:
            runner = ModelRunner(copy_model(self.model))
            self.streams[stream_id] = StreamCopy(runner, self.policy.init_state(runner.source))
        return self.streams[stream_id]

    def _forward_and_adapt(self, s: StreamCopy, x: torch.Tensor) -> torch.Tensor:
        started = time.perf_counter()
        result = s.runner.forward(x, Segments.from_sizes([len(x)]), self.policy, [s.state])
        self.forward_seconds.observe(time.perf_counter() - started)
        self.batch_images.observe(len(x))
        observation = Observation(
            moments=list(result.moments),
            probs=result.probs,
            logits=result.raw_logits,
            accepted=result.gate.accepted,
            open_set=result.gate.open_set,
            grads={k: g[0] for k, g in result.grads.items()},
        )
        s.state = self.policy.update(s.state, observation, s.runner.source).state
        s.samples_seen += len(x)
        s.version += 1
        return result.probs

    async def predict(self, stream_id: str, x: torch.Tensor) -> torch.Tensor:
        s = self.stream(stream_id)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._forward_and_adapt, s, x)

    def state_bytes(self, stream_id: str) -> int:
        """Bytes of the stream's copy: module parameters and buffers plus its policy state."""
        s = self.streams[stream_id]
        module = s.runner.model.module
        tensors = [*module.parameters(), *module.buffers(), *s.state.values()]
        return sum(t.numel() * t.element_size() for t in tensors)


def create_app(model: LoadedModel, policy_name: str = "bn", top_k: int = 5) -> FastAPI:
    server = CopyPerStreamServer(model, build_policy(policy_name))
    spec = model.card.input
    names = model.card.class_names
    limits = DecodeLimits(max_pixels=16_000_000, max_images=256)
    app = FastAPI(title="copy-per-stream baseline")

    def decode_all(blobs: list[bytes]) -> torch.Tensor:
        arrays = [
            decode_image(b, i, spec.height, spec.width, spec.channels, spec.resize, limits)
            for i, b in enumerate(blobs)
        ]
        return images_to_tensor(np.stack(arrays), tuple(spec.mean), tuple(spec.std))

    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.post("/v1/streams/{stream_id}/predict")
    async def predict(request: Request, stream_id: str) -> dict[str, Any]:
        blobs = await extract_images(request, 16 * 1024 * 1024, 256)
        pixels = await run_in_threadpool(decode_all, blobs)
        probs = await server.predict(stream_id, pixels)
        scores, labels = probs.topk(min(top_k, probs.shape[1]), dim=1)
        s = server.streams[stream_id]
        predictions = []
        for row_scores, row_labels in zip(scores.tolist(), labels.tolist(), strict=True):
            top = [
                {"label": c, "class_name": names[c], "score": p}
                for p, c in zip(row_scores, row_labels, strict=True)
            ]
            predictions.append(top[0] | {"top_k": top, "open_set": False})
        adaptation = {
            "policy": policy_name,
            "samples_seen": s.samples_seen,
            "state_version": s.version,
            "degraded": False,
            "reset": False,
        }
        return {"predictions": predictions, "adaptation": adaptation}

    @app.get("/v1/streams/{stream_id}")
    async def summary(stream_id: str) -> dict[str, Any]:
        if stream_id not in server.streams:
            raise ApiError("stream_not_found", f"stream {stream_id!r} has no state", 404)
        s = server.streams[stream_id]
        return {
            "stream_id": stream_id,
            "policy": policy_name,
            "samples_seen": s.samples_seen,
            "state_version": s.version,
            "state_bytes": server.state_bytes(stream_id),
        }

    @app.get("/v2/health/ready")
    async def ready() -> dict[str, bool]:
        return {"ready": True}

    @app.get("/v2/health/live")
    async def live() -> dict[str, bool]:
        return {"live": True}

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(server.registry), media_type=CONTENT_TYPE_LATEST)

    return app


def main(argv: list[str] | None = None) -> int:
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--model", default=os.environ.get("TTASERVE_MODEL") or str(bundled_model_path())
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8100)
    parser.add_argument("--policy", default="bn", help="forward-only policy each copy adapts with")
    args = parser.parse_args(argv)
    threads = int(os.environ.get("TTASERVE_TORCH_THREADS") or 0)
    if threads:
        torch.set_num_threads(threads)
    app = create_app(load_package(Path(args.model)), args.policy)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
