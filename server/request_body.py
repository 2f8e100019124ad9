"""Reading a predict request's body into raw image bytes, within the configured limits."""

from __future__ import annotations

import base64
import binascii
import json

from starlette.datastructures import UploadFile
from starlette.requests import Request

from ttaserve.server.errors import ApiError, InvalidInputError

RAW_IMAGE_TYPES = {"image/png", "image/jpeg", "image/jpg"}


async def read_limited_body(request: Request, max_bytes: int) -> bytes:
    """The whole body, or 413 as soon as it exceeds `max_bytes` (Content-Length or streamed)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise _too_large(max_bytes)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise _too_large(max_bytes)
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large(max_bytes: int) -> ApiError:
    return ApiError("body_too_large", f"request body exceeds {max_bytes} bytes (TTASERVE_MAX_BODY_BYTES)", 413)  # fmt: skip


def _media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


async def extract_images(request: Request, max_bytes: int, max_images: int) -> list[bytes]:
    """Encoded images from a raw image body, a multipart `images` field, or base64 JSON."""
    media = _media_type(request)
    body = await read_limited_body(request, max_bytes)
    if not body:
        raise InvalidInputError("empty_body", "the request body is empty")
    if media in RAW_IMAGE_TYPES:
        images = [body]
    elif media == "multipart/form-data":
        images = await _multipart_images(request, body, max_images)
    elif media == "application/json":
        images = _json_images(body)
    else:
        raise ApiError(
            "unsupported_media_type",
            f"content type {media or 'none'!r}: send image/png, image/jpeg, multipart/form-data "
            "with files in 'images', or JSON {\"images\": [base64, ...]}",
            415,
        )
    if not images:
        raise InvalidInputError("no_images", "the request holds no images")
    if len(images) > max_images:
        raise InvalidInputError("too_many_images", f"{len(images)} images exceed the limit of {max_images} per request (TTASERVE_MAX_IMAGES_PER_REQUEST)", 413)  # fmt: skip
    return images


async def _multipart_images(request: Request, body: bytes, max_images: int) -> list[bytes]:
    request._body = body  # starlette re-reads the cached body for form parsing
    try:
        form = await request.form(max_files=max_images + 1, max_fields=max_images + 16)
    except Exception as exc:  # malformed multipart: starlette raises several types
        raise InvalidInputError("invalid_multipart", f"malformed multipart body: {exc}") from exc
    images = []
    for item in form.getlist("images"):
        if not isinstance(item, UploadFile):
            raise InvalidInputError("invalid_multipart", "the 'images' field must hold files")
        images.append(await item.read())
    await form.close()
    if not images:
        raise InvalidInputError("no_images", "multipart body has no files in the 'images' field")
    return images


def _json_images(body: bytes) -> list[bytes]:
    try:
        payload = json.loads(body)
    except ValueError as exc:
        raise InvalidInputError("invalid_json", f"body is not valid JSON: {exc}") from exc
    items = payload.get("images") if isinstance(payload, dict) else None
    if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
        raise InvalidInputError("invalid_json", 'JSON body must be {"images": ["<base64>", ...]}')
    images = []
    for index, item in enumerate(items):
        try:
            images.append(base64.b64decode(item.split(",", 1)[-1] if item.startswith("data:") else item, validate=True))  # fmt: skip
        except (binascii.Error, ValueError) as exc:
            raise InvalidInputError(
                "invalid_base64", f"image {index}: not valid base64 ({exc})"
            ) from exc
    return images
