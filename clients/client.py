"""A small typed client for ttaserve: `TTAClient` (sync) and `AsyncTTAClient` (asyncio).

    with TTAClient("http://127.0.0.1:8000") as client:
        result = client.predict("camera-7", [png_bytes, numpy_hwc_uint8, "frame.jpg"])
        print(result.predictions[0].class_name, result.adaptation.samples_seen)

Images are encoded bytes (PNG/JPEG), numpy uint8 HWC (or HW) arrays (sent as PNG) or
paths. One image goes as a raw body, several as a multipart `images` field. Errors come
back as `TTAServerError(status, code, message)`; a 503 is retried, honouring Retry-After,
a bounded number of times.
"""

from __future__ import annotations

import asyncio
import io
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np

ImageInput = bytes | bytearray | memoryview | np.ndarray | str | os.PathLike[str]
DEFAULT_TIMEOUT_S = 60.0


class TTAServerError(Exception):
    """The server answered with an error: HTTP status, stable code, message."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message


@dataclass(frozen=True)
class ClassScore:
    label: int
    class_name: str
    score: float


@dataclass(frozen=True)
class Prediction:
    """One image's answer: the top class, the top-k list and the open-set verdict."""

    label: int
    class_name: str
    score: float
    top_k: list[ClassScore]
    open_set: bool
    open_set_score: float | None


@dataclass(frozen=True)
class Adaptation:
    """The stream's adaptation after the request.

    `degraded`: answered without the shared state store (state not saved);
    `reset`: the stream was reset to the source model by its collapse guard;
    `open_set`: how many images of the request were judged unknown (open-set).
    """

    policy: str
    samples_seen: int
    state_version: int
    degraded: bool
    reset: bool
    open_set: int


@dataclass(frozen=True)
class PredictResult:
    predictions: list[Prediction]
    adaptation: Adaptation


@dataclass(frozen=True)
class StreamSummary:
    """What `GET /v1/streams/{id}` (and reset) report about a stream."""

    stream_id: str
    policy: str
    policy_params: dict[str, Any]
    state_version: int
    samples_seen: int
    updates: int
    resets: int
    created_at: float
    updated_at: float
    state_bytes: int


# --- requests and answers (shared by both clients) -----------------------------------------
def encode_image(image: ImageInput) -> bytes:
    """Encoded image bytes: bytes as they are, a uint8 HWC/HW array as PNG, a path's content."""
    if isinstance(image, bytes | bytearray | memoryview):
        return bytes(image)
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim not in (2, 3):
            raise ValueError(f"arrays must be uint8 HW or HWC, got {image.dtype} {image.shape}")
        from PIL import Image

        array = image[:, :, 0] if image.ndim == 3 and image.shape[2] == 1 else image
        buf = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(array)).save(buf, format="PNG")
        return buf.getvalue()
    if isinstance(image, str | os.PathLike):
        return Path(image).read_bytes()
    raise TypeError(f"unsupported image type {type(image).__name__}: bytes, numpy array or path")


def media_type(blob: bytes) -> str:
    """The content type of encoded image bytes (PNG or JPEG by magic number; else PNG)."""
    return "image/jpeg" if blob[:3] == b"\xff\xd8\xff" else "image/png"


def _as_list(images: ImageInput | Sequence[ImageInput]) -> list[ImageInput]:
    if isinstance(images, bytes | bytearray | memoryview | str | os.PathLike):
        return [images]
    if isinstance(images, np.ndarray) and images.ndim in (2, 3):
        return [images]  # one image; a 4-D array is a batch
    return list(images)


def predict_request(
    images: ImageInput | Sequence[ImageInput],
    policy: str | None,
    group: str | None,
    top_k: int | None,
) -> dict[str, Any]:
    """httpx request arguments of a predict call."""
    blobs = [encode_image(i) for i in _as_list(images)]
    if not blobs:
        raise ValueError("predict needs at least one image")
    params = {k: v for k, v in {"policy": policy, "top_k": top_k}.items() if v is not None}
    headers = {"x-stream-group": group} if group else {}
    if len(blobs) == 1:
        headers["content-type"] = media_type(blobs[0])
        return {"params": params, "headers": headers, "content": blobs[0]}
    files = [("images", (f"{i}", b, media_type(b))) for i, b in enumerate(blobs)]
    return {"params": params, "headers": headers, "files": files}


def parse_predict(body: dict[str, Any]) -> PredictResult:
    predictions = [
        Prediction(
            label=int(p["label"]),
            class_name=str(p["class_name"]),
            score=float(p["score"]),
            top_k=[
                ClassScore(int(t["label"]), str(t["class_name"]), float(t["score"]))
                for t in p.get("top_k", [])
            ],
            open_set=bool(p.get("open_set", False)),
            open_set_score=None if p.get("open_set_score") is None else float(p["open_set_score"]),
        )
        for p in body["predictions"]
    ]
    a = body["adaptation"]
    open_set = a.get("open_set")
    if isinstance(open_set, list):
        open_count = sum(bool(v) for v in open_set)
    elif open_set is None:  # older servers: count the flags of the predictions
        open_count = sum(p.open_set for p in predictions)
    else:
        open_count = int(open_set)
    adaptation = Adaptation(
        policy=str(a["policy"]),
        samples_seen=int(a["samples_seen"]),
        state_version=int(a["state_version"]),
        degraded=bool(a.get("degraded", False)),
        reset=bool(a.get("reset", False)),
        open_set=open_count,
    )
    return PredictResult(predictions, adaptation)


def parse_summary(body: dict[str, Any]) -> StreamSummary:
    fields = StreamSummary.__dataclass_fields__
    return StreamSummary(**{k: body[k] for k in fields if k in body})


def raise_for_error(response: httpx.Response) -> None:
    """Raise `TTAServerError` from the server's `{"error": {"code", "message"}}` body."""
    if response.status_code < 400:
        return
    code, message = f"http_{response.status_code}", response.text[:500]
    try:
        error = response.json().get("error")
    except ValueError:
        error = None
    if isinstance(error, dict):
        code, message = str(error.get("code", code)), str(error.get("message", message))
    elif isinstance(error, str):
        message = error
    raise TTAServerError(response.status_code, code, message)


def retry_delay(response: httpx.Response, attempt: int, max_wait_s: float) -> float | None:
    """Seconds to wait before retrying a 503 (Retry-After, else backoff); None: don't retry."""
    if response.status_code != 503:
        return None
    header = response.headers.get("retry-after", "")
    try:
        wait = float(header)
    except ValueError:
        wait = 0.1 * 2**attempt  # an HTTP-date or nothing: exponential backoff
    return min(max(wait, 0.0), max_wait_s)


def _stream_path(stream_id: str, action: str = "") -> str:
    return f"/v1/streams/{stream_id}" + (f"/{action}" if action else "")


# --- the clients ---------------------------------------------------------------------------
class TTAClient:
    """Synchronous client of one ttaserve server."""

    def __init__(
        self,
        base_url: str,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        max_retries: int = 3,
        max_retry_wait_s: float = 10.0,
        http: httpx.Client | None = None,
    ) -> None:
        self._http = http or httpx.Client(base_url=base_url, timeout=timeout_s)
        self.max_retries = max_retries
        self.max_retry_wait_s = max_retry_wait_s

    def __enter__(self) -> TTAClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        for attempt in range(self.max_retries + 1):
            response = self._http.request(method, path, **kwargs)
            wait = retry_delay(response, attempt, self.max_retry_wait_s)
            if wait is None or attempt == self.max_retries:
                break
            time.sleep(wait)
        raise_for_error(response)
        return response

    def predict(
        self,
        stream_id: str,
        images: ImageInput | Sequence[ImageInput],
        *,
        policy: str | None = None,
        group: str | None = None,
        top_k: int | None = None,
    ) -> PredictResult:
        """Adapted predictions for the images; the stream's state moves on."""
        request = predict_request(images, policy, group, top_k)
        return parse_predict(
            self._request("POST", _stream_path(stream_id, "predict"), **request).json()
        )

    def reset(self, stream_id: str, policy: str | None = None) -> StreamSummary:
        """Return the stream to the source model (optionally switching its policy)."""
        params = {"policy": policy} if policy else {}
        return parse_summary(
            self._request("POST", _stream_path(stream_id, "reset"), params=params).json()
        )

    def summary(self, stream_id: str) -> StreamSummary:
        return parse_summary(self._request("GET", _stream_path(stream_id)).json())

    def delete(self, stream_id: str, *, missing_ok: bool = False) -> bool:
        """Forget the stream; False (with `missing_ok`) when it had no state."""
        try:
            self._request("DELETE", _stream_path(stream_id))
        except TTAServerError as exc:
            if missing_ok and exc.status == 404:
                return False
            raise
        return True

    def health(self) -> bool:
        """Liveness: True when the process answers."""
        try:
            return self._http.get("/v2/health/live").status_code == 200
        except httpx.TransportError:
            return False

    def ready(self) -> bool:
        """Readiness: True once the model is loaded and warmed up."""
        try:
            return self._http.get("/v2/health/ready").status_code == 200
        except httpx.TransportError:
            return False

    def wait_ready(self, timeout_s: float = 60.0, interval_s: float = 0.1) -> None:
        deadline = time.monotonic() + timeout_s
        while not self.ready():
            if time.monotonic() > deadline:
                raise TimeoutError(f"server not ready after {timeout_s} s")
            time.sleep(interval_s)

    def model_info(self) -> dict[str, Any]:
        """The served model's card plus the known and the default policies."""
        return self._request("GET", "/v1/model").json()


class AsyncTTAClient:
    """Asyncio client of one ttaserve server (same methods as `TTAClient`, awaited)."""

    def __init__(
        self,
        base_url: str,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        max_retries: int = 3,
        max_retry_wait_s: float = 10.0,
        http: httpx.AsyncClient | None = None,
    ) -> None:
        self._http = http or httpx.AsyncClient(base_url=base_url, timeout=timeout_s)
        self.max_retries = max_retries
        self.max_retry_wait_s = max_retry_wait_s

    async def __aenter__(self) -> AsyncTTAClient:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        for attempt in range(self.max_retries + 1):
            response = await self._http.request(method, path, **kwargs)
            wait = retry_delay(response, attempt, self.max_retry_wait_s)
            if wait is None or attempt == self.max_retries:
                break
            await asyncio.sleep(wait)
        raise_for_error(response)
        return response

    async def predict(
        self,
        stream_id: str,
        images: ImageInput | Sequence[ImageInput],
        *,
        policy: str | None = None,
        group: str | None = None,
        top_k: int | None = None,
    ) -> PredictResult:
        request = predict_request(images, policy, group, top_k)
        return parse_predict(
            (await self._request("POST", _stream_path(stream_id, "predict"), **request)).json()
        )

    async def reset(self, stream_id: str, policy: str | None = None) -> StreamSummary:
        params = {"policy": policy} if policy else {}
        return parse_summary(
            (await self._request("POST", _stream_path(stream_id, "reset"), params=params)).json()
        )

    async def summary(self, stream_id: str) -> StreamSummary:
        return parse_summary((await self._request("GET", _stream_path(stream_id))).json())

    async def delete(self, stream_id: str, *, missing_ok: bool = False) -> bool:
        try:
            await self._request("DELETE", _stream_path(stream_id))
        except TTAServerError as exc:
            if missing_ok and exc.status == 404:
                return False
            raise
        return True

    async def health(self) -> bool:
        try:
            return (await self._http.get("/v2/health/live")).status_code == 200
        except httpx.TransportError:
            return False

    async def ready(self) -> bool:
        try:
            return (await self._http.get("/v2/health/ready")).status_code == 200
        except httpx.TransportError:
            return False

    async def wait_ready(self, timeout_s: float = 60.0, interval_s: float = 0.1) -> None:
        deadline = time.monotonic() + timeout_s
        while not await self.ready():
            if time.monotonic() > deadline:
                raise TimeoutError(f"server not ready after {timeout_s} s")
            await asyncio.sleep(interval_s)

    async def model_info(self) -> dict[str, Any]:
        return (await self._request("GET", "/v1/model")).json()
