"""HTTP routes (glue only): decode and validate, then hand over to the dataplane.

`create_app(settings, model, store)` builds the app; tests inject small models and stores.
"""

from __future__ import annotations

import contextlib
import gc
import logging
from collections.abc import AsyncIterator
from typing import Annotated, Any

import numpy as np
import torch
from fastapi import FastAPI, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.concurrency import run_in_threadpool

from ttaserve import __version__
from ttaserve.adapters.registry import POLICIES
from ttaserve.server.allocator import tune_glibc_malloc
from ttaserve.server.batcher import CrossStreamBatcher, PredictJob
from ttaserve.server.compiled_forward import UnsupportedModelError
from ttaserve.server.dataplane import DataPlane, PredictOutcome
from ttaserve.server.decoding import DecodeLimits, decode_image, images_to_tensor
from ttaserve.server.errors import ApiError, InvalidInputError, OverloadedError
from ttaserve.server.metrics import ServerMetrics
from ttaserve.server.model_package import LoadedModel, load_package
from ttaserve.server.model_runner import ModelRunner, intra_op_threads
from ttaserve.server.request_body import extract_images
from ttaserve.server.request_metrics import RequestMetricsMiddleware
from ttaserve.server.settings import Settings
from ttaserve.server.state import StreamState, encode_state
from ttaserve.server.stores.base import StateStore, StoreUnavailableError
from ttaserve.server.stores.memory import InMemoryStateStore

log = logging.getLogger(__name__)

# Bodies up to this size decode on the event loop (a few 32x32 PNGs take tens of µs);
# larger ones in the thread pool, so that one big JPEG cannot stall other requests.
INLINE_DECODE_MAX_BYTES = 64 * 1024
STREAM_ID_PATTERN = r"^[A-Za-z0-9._:-]{1,128}$"
StreamId = Annotated[str, Path(pattern=STREAM_ID_PATTERN, description="client-chosen stream name")]  # fmt: skip
PolicyName = Annotated[str | None, Query(description="adaptation policy (fixed at a stream's first request)")]  # fmt: skip


def build_store(settings: Settings) -> StateStore:
    """The configured state store: Redis when TTASERVE_REDIS_URL is set, else in-process."""
    if settings.redis_url:
        from ttaserve.server.stores.redis import RedisStateStore

        return RedisStateStore(
            settings.redis_url,
            ttl_seconds=settings.stream_ttl_seconds,
            connect_timeout_s=settings.redis_connect_timeout_s,
            socket_timeout_s=settings.redis_timeout_s,
            breaker_cooldown_s=settings.redis_breaker_cooldown_s,
            count_method=settings.redis_count_method,  # type: ignore[arg-type]
        )
    return InMemoryStateStore(max_streams=settings.max_streams, ttl_seconds=settings.stream_ttl_seconds)  # fmt: skip


def _check_policy(name: str | None) -> str | None:
    if name is not None and name not in POLICIES:
        raise InvalidInputError("unknown_policy", f"unknown policy {name!r}; known: {', '.join(sorted(POLICIES))}")  # fmt: skip
    return name


def _summary(stream_id: str, state: StreamState) -> dict[str, Any]:
    return {
        "stream_id": stream_id,
        "policy": state.policy,
        "policy_params": state.policy_params,
        "state_version": state.version,
        "samples_seen": state.samples_seen,
        "updates": state.updates,
        "resets": state.resets,
        "created_at": state.created_at,
        "updated_at": state.updated_at,
        "state_bytes": len(encode_state(state)),
    }


def _outcome_json(outcome: PredictOutcome) -> dict[str, Any]:
    return {
        "predictions": [p.__dict__ for p in outcome.predictions],
        "adaptation": {
            "policy": outcome.policy,
            "samples_seen": outcome.samples_seen,
            "state_version": outcome.state_version,
            "degraded": outcome.degraded,
            "reset": outcome.reset,
        },
    }


def create_app(  # noqa: C901 - a factory of small route closures
    settings: Settings | None = None,
    model: LoadedModel | None = None,
    store: StateStore | None = None,
) -> FastAPI:
    """Build the ASGI app; the model loads now, the batcher starts with the app."""
    settings = settings or Settings()
    if settings.malloc_tuning:
        tune_glibc_malloc()
    # Only the forward thread runs parallel (OpenMP) torch operations. Every thread that
    # does gets an OpenMP team of its own, and once a process holds more OpenMP threads than
    # CPUs, libgomp stops spinning between parallel regions: each elementwise layer of a
    # forward pass then waits for its team to wake up. Measured on 2 CPUs, a forward thread
    # beside one idle team from loading the model ran `source` at 32 images 1.3x and `bn`
    # 1.5x slower. So the model loads on one intra-op thread, requests decode in NumPy,
    # the warm-up runs in the forward thread, and the forward thread sets its own count.
    forward_threads = settings.torch_threads or torch.get_num_threads()
    with intra_op_threads(1):
        model = model or load_package(settings.model)
        runner = ModelRunner(model)
    store = store or build_store(settings)
    metrics = ServerMetrics()
    dataplane = DataPlane(runner, store, metrics, settings.default_policy, max_groups=settings.max_groups, single_thread_below_images=settings.single_thread_below_images, forward_threads=forward_threads, writes_in_flight=settings.writes_in_flight)  # fmt: skip
    if compiled := settings.compiled_policy_names():
        unknown = sorted(set(compiled) - set(POLICIES))
        if unknown:
            raise ValueError(f"TTASERVE_COMPILE_POLICIES names unknown policies {unknown}; known: {', '.join(sorted(POLICIES))}")  # fmt: skip
        try:
            runner.compile([dataplane.policy(name) for name in compiled])
        except UnsupportedModelError as exc:
            log.error("not compiling: %s; the model runs eager", exc)
    batcher = CrossStreamBatcher(
        dataplane.begin_batch,
        max_batch_images=settings.max_batch_size,
        max_wait_s=settings.max_batch_wait_ms / 1000,
        max_queue_images=settings.max_queue_images,
        max_gather_s=settings.max_batch_gather_ms / 1000,
        active_window_s=settings.batch_active_window_ms / 1000,
    )
    spec = model.card.input
    limits = DecodeLimits(max_pixels=settings.max_image_pixels, max_images=settings.max_images_per_request)  # fmt: skip
    status = {"ready": False}

    def decode_all(blobs: list[bytes]) -> torch.Tensor:
        arrays = [
            decode_image(b, i, spec.height, spec.width, spec.channels, spec.resize, limits)
            for i, b in enumerate(blobs)
        ]
        return images_to_tensor(np.stack(arrays), tuple(spec.mean), tuple(spec.std))

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if not await store.ping():  # degraded mode serves anyway; say so at start-up
            log.warning("state store unreachable at start-up: answering degraded until it returns")  # fmt: skip
        batcher.start()
        # decoded zeros: the layout requests have (a compiled forward is specialized on it)
        # (as many as the largest forward pass when compiling: `DataPlane.warm_up`)
        rows = max(settings.max_batch_size, settings.max_images_per_request) if compiled else 1
        blank = np.zeros((rows, spec.height, spec.width, spec.channels), np.uint8)
        warm = images_to_tensor(blank, tuple(spec.mean), tuple(spec.std))
        for name in POLICIES:  # warm-up: first forward of each policy before readiness
            await dataplane.warm_up(name, warm)
        # The model, policies and libraries live as long as the process: move them out of
        # the cyclic collector's generations so that its passes over the per-batch garbage
        # stop re-scanning them (measured ~10 ms per 48-stream batch).
        gc.collect()
        gc.freeze()
        status["ready"] = True
        log.info("ttaserve ready: model %s, policy %s", model.card.name, settings.default_policy)
        try:
            yield
        finally:
            status["ready"] = False
            await batcher.drain(timeout_s=30)
            await batcher.stop()
            await dataplane.flush()  # state writes still in flight
            dataplane.close()
            await store.close()

    app = FastAPI(title="ttaserve", version=__version__, lifespan=lifespan)
    app.add_middleware(RequestMetricsMiddleware, metrics=metrics)
    app.state.settings, app.state.dataplane, app.state.metrics = settings, dataplane, metrics

    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError) -> JSONResponse:
        headers = {"Retry-After": str(int(exc.retry_after_s))} if isinstance(exc, OverloadedError) else None  # fmt: skip
        return JSONResponse(exc.body(), status_code=exc.status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())  # fmt: skip
        return JSONResponse({"error": {"code": "invalid_request", "message": problems}}, status_code=422)  # fmt: skip

    @app.post("/v1/streams/{stream_id}/predict")
    async def predict(
        request: Request,
        stream_id: StreamId,
        policy: PolicyName = None,
        top_k: Annotated[int | None, Query(ge=1)] = None,
    ) -> JSONResponse:
        """Adapted predictions for one or more images of a stream."""
        _check_policy(policy)
        blobs = await extract_images(request, settings.max_body_bytes, settings.max_images_per_request)  # fmt: skip
        if sum(map(len, blobs)) <= INLINE_DECODE_MAX_BYTES:  # a thread hop costs more
            pixels = decode_all(blobs)
        else:
            pixels = await run_in_threadpool(decode_all, blobs)
        job = PredictJob(
            stream_id=stream_id,
            requested_policy=policy,
            pixels=pixels,
            group=request.headers.get("x-stream-group", "default"),
            top_k=min(top_k or settings.top_k, model.num_classes),
        )
        metrics.queued_images.set(batcher.queued_images + job.size)
        # a JSONResponse skips FastAPI's jsonable_encoder pass (~50 us per request)
        return JSONResponse(_outcome_json(await batcher.submit(job)))

    @app.post("/v1/streams/{stream_id}/reset")
    async def reset(stream_id: StreamId, policy: PolicyName = None) -> dict[str, Any]:
        """Return the stream to the source model (and optionally change its policy)."""
        _check_policy(policy)
        try:
            state = await dataplane.reset(stream_id, policy)
        except StoreUnavailableError as exc:
            raise ApiError("store_unavailable", f"state store unavailable: {exc}", 503) from exc
        await _refresh_stream_count()
        return _summary(stream_id, state)

    @app.get("/v1/streams/{stream_id}")
    async def summary(stream_id: StreamId) -> dict[str, Any]:
        """The stream's adaptation summary."""
        try:
            state = await dataplane.read_state(stream_id)
        except StoreUnavailableError as exc:
            raise ApiError("store_unavailable", f"state store unavailable: {exc}", 503) from exc
        if state is None:
            raise ApiError("stream_not_found", f"stream {stream_id!r} has no state", 404)
        return _summary(stream_id, state)

    @app.delete("/v1/streams/{stream_id}", status_code=204)
    async def delete(stream_id: StreamId) -> Response:
        """Forget the stream's state."""
        try:
            existed = await dataplane.delete(stream_id)
        except StoreUnavailableError as exc:
            raise ApiError("store_unavailable", f"state store unavailable: {exc}", 503) from exc
        if not existed:
            raise ApiError("stream_not_found", f"stream {stream_id!r} has no state", 404)
        await _refresh_stream_count()
        return Response(status_code=204)

    @app.get("/v1/model")
    async def model_info() -> dict[str, Any]:
        """The served model's card."""
        return model.card.model_dump() | {"policies": sorted(POLICIES), "default_policy": settings.default_policy}  # fmt: skip

    @app.get("/v2/health/live")
    async def live() -> dict[str, bool]:
        return {"live": True}

    @app.get("/v2/health/ready")
    async def ready() -> JSONResponse:
        ok = status["ready"]
        return JSONResponse({"ready": ok}, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics_endpoint() -> Response:
        await _refresh_stream_count()
        metrics.queued_images.set(batcher.queued_images)
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def _refresh_stream_count() -> None:
        with contextlib.suppress(StoreUnavailableError):
            metrics.active_streams.set(await store.count())

    return app
