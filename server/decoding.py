"""Decoding and validation of request images. Nothing here touches stream state.

Every failure raises `InvalidInputError` with a message a client can act on; the route turns
it into a 4xx JSON error before the request reaches the batcher.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from PIL import Image, ImageFile, UnidentifiedImageError

from ttaserve.server.errors import InvalidInputError

ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error, never half an image
ResizePolicy = Literal["resize", "center_crop", "exact"]
_CHANNELS_BY_MODE = {"1": 1, "L": 1, "P": 3, "RGB": 3, "RGBA": 4, "LA": 2, "CMYK": 3, "YCbCr": 3, "I": 1, "F": 1, "I;16": 1}  # fmt: skip
_ACCEPTED_FORMATS = {"PNG", "JPEG"}


@dataclass(frozen=True)
class DecodeLimits:
    """Bounds that protect the server from oversized or malicious images."""

    max_pixels: int = 16_000_000  # guards against decompression bombs
    max_images: int = 256


def _check_size(img: Image.Image, index: int, limits: DecodeLimits) -> None:
    width, height = img.size
    if width < 1 or height < 1:
        raise InvalidInputError("invalid_image", f"image {index}: empty image")
    if width * height > limits.max_pixels:
        raise InvalidInputError(
            "image_too_large",
            f"image {index}: {width}x{height} = {width * height} pixels exceeds the limit "
            f"of {limits.max_pixels} (TTASERVE_MAX_IMAGE_PIXELS)",
            status=413,
        )


def _to_channels(img: Image.Image, index: int, channels: int) -> Image.Image:
    have = _CHANNELS_BY_MODE.get(img.mode)
    if have != channels:
        raise InvalidInputError(
            "wrong_channel_count",
            f"image {index}: has {have if have is not None else 'unknown'} channels "
            f"(mode {img.mode}), the model expects {channels}",
        )
    return img.convert("RGB" if channels == 3 else "L")


def _fit(
    img: Image.Image, index: int, height: int, width: int, policy: ResizePolicy
) -> Image.Image:
    if img.size == (width, height):
        return img
    if policy == "exact":
        raise InvalidInputError(
            "wrong_image_size",
            f"image {index}: is {img.size[0]}x{img.size[1]}, the model expects {width}x{height}",
        )
    if policy == "center_crop":
        scale = max(width / img.size[0], height / img.size[1])
        img = img.resize((max(width, round(img.size[0] * scale)), max(height, round(img.size[1] * scale))), Image.BILINEAR)  # fmt: skip
        left, top = (img.size[0] - width) // 2, (img.size[1] - height) // 2
        return img.crop((left, top, left + width, top + height))
    return img.resize((width, height), Image.BILINEAR)


def decode_image(
    data: bytes,
    index: int,
    height: int,
    width: int,
    channels: int,
    resize: ResizePolicy,
    limits: DecodeLimits,
) -> np.ndarray:
    """Decode one PNG/JPEG to a uint8 (H, W, C) array of the model's input size."""
    if not data:
        raise InvalidInputError("empty_image", f"image {index}: empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            if img.format not in _ACCEPTED_FORMATS:
                raise InvalidInputError("unsupported_format", f"image {index}: format {img.format} is not PNG or JPEG")  # fmt: skip
            _check_size(img, index, limits)
            img.load()
    except InvalidInputError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InvalidInputError("image_too_large", f"image {index}: {exc}", status=413) from exc
    except UnidentifiedImageError as exc:
        raise InvalidInputError(
            "invalid_image", f"image {index}: cannot be decoded ({exc})"
        ) from exc
    except (OSError, SyntaxError, ValueError) as exc:  # truncated or corrupt data
        raise InvalidInputError(
            "invalid_image", f"image {index}: corrupt or truncated ({exc})"
        ) from exc
    img = _fit(_to_channels(img, index, channels), index, height, width, resize)
    array = np.asarray(img, dtype=np.uint8)
    return array[:, :, None] if array.ndim == 2 else array


def images_to_tensor(
    images: np.ndarray | torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]
) -> torch.Tensor:
    """uint8 (N, H, W, C) -> normalized float32 (N, C, H, W) (channels-last strides).

    In NumPy, not torch: this runs in request threads, which must not run parallel torch
    operations (see `create_app` in server/app.py). Same values as the torch arithmetic,
    bit for bit."""
    array = images.numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    x = array.astype(np.float32) / np.float32(255)
    x -= np.asarray(mean, dtype=np.float32)
    x /= np.asarray(std, dtype=np.float32)
    return torch.from_numpy(x).permute(0, 3, 1, 2)
