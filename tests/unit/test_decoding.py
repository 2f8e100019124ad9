import io

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import png_claiming_size
from ttaserve.server.decoding import DecodeLimits, decode_image, images_to_tensor
from ttaserve.server.errors import InvalidInputError

LIMITS = DecodeLimits(max_pixels=100_000)


def _encode(array: np.ndarray, fmt: str, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array, mode=mode).save(buf, format=fmt)
    return buf.getvalue()


def _decode(data: bytes, resize="resize", limits=LIMITS):
    return decode_image(data, 0, 32, 32, 3, resize, limits)


def test_png_round_trip_is_exact_and_jpeg_decodes():
    image = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    assert np.array_equal(_decode(_encode(image, "PNG")), image)
    assert _decode(_encode(image, "JPEG")).shape == (32, 32, 3)


def test_other_sizes_are_resized_or_center_cropped_or_rejected():
    image = np.zeros((64, 48, 3), dtype=np.uint8)
    assert _decode(_encode(image, "PNG")).shape == (32, 32, 3)
    assert _decode(_encode(image, "PNG"), "center_crop").shape == (32, 32, 3)
    with pytest.raises(InvalidInputError) as err:
        _decode(_encode(image, "PNG"), "exact")
    assert err.value.code == "wrong_image_size"


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (b"", "empty_image"),
        (b"not an image at all", "invalid_image"),
        (_encode(np.zeros((32, 32, 3), np.uint8), "PNG")[:60], "invalid_image"),  # truncated
        (_encode(np.zeros((32, 32), np.uint8), "PNG"), "wrong_channel_count"),  # greyscale
        (_encode(np.zeros((32, 32, 4), np.uint8), "PNG"), "wrong_channel_count"),  # RGBA
        (_encode(np.zeros((32, 32, 3), np.uint8), "BMP"), "unsupported_format"),
        (_encode(np.zeros((400, 400, 3), np.uint8), "PNG"), "image_too_large"),
    ],
)
def test_bad_images_raise_clear_errors(data, code):
    with pytest.raises(InvalidInputError) as err:
        _decode(data)
    assert err.value.code == code
    assert err.value.status in (413, 422)


def test_decompression_bomb_is_rejected_before_decoding():
    # a tiny PNG that claims 20000 x 20000 pixels: refused from its header alone
    bomb = png_claiming_size(_encode(np.zeros((1, 1, 3), dtype=np.uint8), "PNG"), 20000, 20000)
    with pytest.raises(InvalidInputError) as err:
        _decode(bomb)
    assert err.value.code == "image_too_large"


def test_images_to_tensor_normalizes_like_torch_arithmetic_bit_for_bit():
    """NumPy normalization (request threads stay out of OpenMP) = the torch formula."""
    images = np.random.default_rng(0).integers(0, 256, size=(5, 8, 6, 3), dtype=np.uint8)
    mean, std = (0.4914, 0.4822, 0.4465), (0.247, 0.243, 0.261)
    got = images_to_tensor(images, mean, std)
    x = torch.as_tensor(images).permute(0, 3, 1, 2).float().div_(255)
    expected = (x - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)
    assert got.shape == (5, 3, 8, 6) and got.dtype == torch.float32
    assert torch.equal(got, expected)
    assert got.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(images_to_tensor(torch.from_numpy(images), mean, std), got)
