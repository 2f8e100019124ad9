"""Common corruptions (CIFAR-10-C / ImageNet-C, Hendrycks & Dietterich 2019) for 32x32 images.

The functions are those of the `imagecorruptions` package, with its ImageNet-C severity
parameters, so severity-5 numbers are not comparable with the published CIFAR-10-C files
(which use milder, 32-pixel-specific constants). Each of the 15 was checked on CIFAR-10
test images at 32x32, severities 5 and 3 (looked at, and scored with a ResNet-20):

- applied at 32x32: `gaussian_noise`, `shot_noise`, `impulse_noise`, `brightness`,
  `contrast` (per-pixel or global: size-free), `pixelate` and `zoom_blur` (relative to
  the image size), `jpeg_compression` (8x8 blocks are what a 32x32 JPEG really gets),
  and `glass_blur` (local pixel shuffling like CIFAR-10-C's; at 224 px its Python loop
  takes ~1 s per image);
- applied at 224x224 (bicubic upscale, corrupt, area downscale), because their
  parameters are pixel lengths of a 224x224 image: `defocus_blur` (a 10 px disk wipes a
  32 px image out; severities 3 and 5 both fall to chance), `motion_blur` (20 px streaks),
  `snow` (flakes zoomed and streaked over the whole image), `frost` (the frost texture
  crop is 7x too coarse), `fog` (its plasma map is drawn at the image's size: 5 octaves
  at 32 px instead of 8) and `elastic_transform` (a 0.3 px smoothing of the displacement
  field makes it pixel scrambling instead of a warp).

All 15 are kept. Severity 5 is harsh at 32 px: with a partly trained ResNet-20 (58%
clean), source accuracy is 11-17% on the noises, glass_blur, fog and contrast, and
25-51% elsewhere; `bn` recovers 8-28 points on every one of them, so each still ranks
policies.

`KEPT_CORRUPTIONS` lists what the benchmark uses, in the standard CIFAR-10-C order.

Shims inside the package's module (nothing is changed globally) make it work on current
dependencies: a stand-in `pkg_resources.resource_filename` during its import (setuptools
>= 81 has no `pkg_resources`), `skimage.filters.gaussian(multichannel=...)` mapped to
`channel_axis` (the keyword is gone from scikit-image; glass_blur failed), `np.float_`
(gone from NumPy 2; fog failed), and `skimage.util.random_noise` seeded from NumPy's
global generator (impulse_noise was not reproducible).

Each image is corrupted with NumPy's global generator seeded from (corruption, severity,
image bytes), so results do not depend on the image's position, the subset or the worker.
Results are cached as `.npz` under `.cache/bench/`, keyed by (corruption, severity,
hash of the images).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import sys
import types
import warnings
import zlib
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from functools import cache
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

CORRUPTIONS: tuple[str, ...] = (
    "gaussian_noise", "shot_noise", "impulse_noise",
    "defocus_blur", "glass_blur", "motion_blur", "zoom_blur",
    "snow", "frost", "fog", "brightness",
    "contrast", "elastic_transform", "pixelate", "jpeg_compression",
)  # fmt: skip
UPSCALED_CORRUPTIONS = frozenset(
    {"defocus_blur", "motion_blur", "snow", "frost", "fog", "elastic_transform"}
)
KEPT_CORRUPTIONS: tuple[str, ...] = CORRUPTIONS
DESIGN_SIZE = 224  # ImageNet-C's image size, which the pixel-length parameters assume
DEFAULT_CACHE_DIR = Path(".cache/bench")
CHUNK = 64  # images per worker task


class _NumpyWithFloat(types.ModuleType):
    """`numpy` plus the `float_` alias that NumPy 2 removed (for `plasma_fractal`)."""

    float_ = np.float64

    def __getattr__(self, name: str) -> Any:
        return getattr(np, name)


class _SkimageWithSeededNoise(types.ModuleType):
    """`skimage` whose `util.random_noise` draws from NumPy's global (seeded) generator."""

    def __init__(self, skimage: types.ModuleType) -> None:
        super().__init__("skimage")
        self._skimage = skimage

        def random_noise(image: np.ndarray, **kw: Any) -> np.ndarray:
            kw.setdefault("rng", np.random.randint(2**31))
            return skimage.util.random_noise(image, **kw)

        self.util = types.SimpleNamespace(random_noise=random_noise)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._skimage, name)


def _gaussian_compat(gaussian: Callable[..., np.ndarray]) -> Callable[..., np.ndarray]:
    """`skimage.filters.gaussian` accepting the removed `multichannel` keyword."""

    def wrapped(image: np.ndarray, sigma: Any = 1, multichannel: bool | None = None, **kw: Any):
        if multichannel:
            kw["channel_axis"] = -1
        return gaussian(image, sigma=sigma, **kw)

    return wrapped


def _package_file(package: str, relative: str) -> str:
    spec = importlib.util.find_spec(package)
    assert spec is not None and spec.origin is not None
    return os.path.join(os.path.dirname(spec.origin), relative)


@cache
def _imagecorruptions() -> types.ModuleType:
    """Import `imagecorruptions` with the shims described in the module docstring."""
    if importlib.util.find_spec("imagecorruptions") is None:
        raise ModuleNotFoundError(
            "the accuracy benchmark needs imagecorruptions: pip install 'ttaserve[bench]'"
        )
    added = []
    if importlib.util.find_spec("pkg_resources") is None:
        stand_in = types.ModuleType("pkg_resources")
        stand_in.resource_filename = _package_file  # type: ignore[attr-defined]
        sys.modules["pkg_resources"] = stand_in
        added.append("pkg_resources")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # scipy.ndimage.interpolation
            package = importlib.import_module("imagecorruptions")
            module = importlib.import_module("imagecorruptions.corruptions")
    finally:
        for name in added:  # the package keeps its own reference; nobody else sees the stand-in
            del sys.modules[name]
    module.gaussian = _gaussian_compat(module.gaussian)  # type: ignore[attr-defined]
    module.sk = _SkimageWithSeededNoise(module.sk)  # type: ignore[attr-defined]
    if not hasattr(np, "float_"):
        module.np = _NumpyWithFloat("numpy")  # type: ignore[attr-defined]
    return package


def check_corruption(name: str) -> None:
    """Raise a clear error for a name that is not one of the 15 common corruptions."""
    if name not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {name!r}; known: {', '.join(CORRUPTIONS)}")


def image_seed(image: np.ndarray, corruption: str, severity: int) -> int:
    """A 32-bit seed from the corruption, the severity and the image's bytes."""
    digest = hashlib.blake2b(np.ascontiguousarray(image).tobytes(), digest_size=8)
    digest.update(f"{corruption}:{severity}".encode())
    return zlib.crc32(digest.digest())


def _resize(image: np.ndarray, size: tuple[int, int], method: Image.Resampling) -> np.ndarray:
    return np.asarray(Image.fromarray(image).resize(size, method))


def corrupt_image(image: np.ndarray, corruption: str, severity: int) -> np.ndarray:
    """One uint8 (H, W, 3) image corrupted deterministically (see the module docstring)."""
    check_corruption(corruption)
    package = _imagecorruptions()
    np.random.seed(image_seed(image, corruption, severity))  # the package uses the global RNG
    height, width = image.shape[:2]
    if corruption not in UPSCALED_CORRUPTIONS or min(height, width) >= DESIGN_SIZE:
        return package.corrupt(image, corruption_name=corruption, severity=severity)
    scale = DESIGN_SIZE / min(height, width)
    big = _resize(image, (round(width * scale), round(height * scale)), Image.Resampling.BICUBIC)
    big = package.corrupt(big, corruption_name=corruption, severity=severity)
    return _resize(big, (width, height), Image.Resampling.BOX)


def _corrupt_chunk(images: np.ndarray, corruption: str, severity: int) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # third-party deprecation noise, once per image
        return np.stack([corrupt_image(im, corruption, severity) for im in images])


def corrupt_images(
    images: np.ndarray,
    corruption: str,
    severity: int,
    workers: int = 1,
    progress: Callable[[int], None] | None = None,
) -> np.ndarray:
    """uint8 (N, H, W, 3) images corrupted one by one, in `workers` processes if > 1."""
    check_corruption(corruption)
    if not 1 <= severity <= 5:
        raise ValueError(f"severity must be in 1..5, got {severity}")
    chunks = [images[i : i + CHUNK] for i in range(0, len(images), CHUNK)]
    done: list[np.ndarray] = []
    if workers <= 1 or len(chunks) <= 1:
        for chunk in chunks:
            done.append(_corrupt_chunk(chunk, corruption, severity))
            if progress:
                progress(len(chunk))
    else:
        # spawn: the parent holds torch's thread pools, which forked children must not inherit
        with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
            futures = [pool.submit(_corrupt_chunk, c, corruption, severity) for c in chunks]
            for future, chunk in zip(futures, chunks, strict=True):
                done.append(future.result())
                if progress:
                    progress(len(chunk))
    return np.concatenate(done) if done else images.copy()


def images_digest(images: np.ndarray) -> str:
    """A short content hash of an image array (the cache key's subset part)."""
    digest = hashlib.sha256(str(images.shape).encode())
    digest.update(np.ascontiguousarray(images).tobytes())
    return digest.hexdigest()[:16]


def cached_corrupt_images(
    images: np.ndarray,
    corruption: str,
    severity: int,
    cache_dir: Path | None = DEFAULT_CACHE_DIR,
    workers: int = 1,
    progress: Callable[[int], None] | None = None,
) -> np.ndarray:
    """`corrupt_images`, read from or written to `cache_dir` (None: no cache)."""
    if cache_dir is None:
        return corrupt_images(images, corruption, severity, workers, progress)
    path = Path(cache_dir) / f"{corruption}-s{severity}-{images_digest(images)}.npz"
    if path.is_file():
        with np.load(path, allow_pickle=False) as data:
            cached = data["x"]
        if cached.shape == images.shape:
            if progress:
                progress(len(images))
            return cached
    corrupted = corrupt_images(images, corruption, severity, workers, progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(f".{os.getpid()}.tmp.npz")
    np.savez(partial, x=corrupted)
    partial.replace(path)  # atomic: a concurrent or interrupted run never reads half a file
    return corrupted
