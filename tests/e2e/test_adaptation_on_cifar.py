"""The bundled demo model on covariate-shifted CIFAR-10 through real HTTP: adaptation
must clearly beat the frozen model, for batches and for single-image streams."""

import numpy as np
import pytest

from conftest import png_bytes, require_bundled_model, require_cifar10, running_server
from ttaserve.clients.client import TTAClient
from ttaserve.server.settings import Settings


@pytest.fixture(scope="module")
def shifted_stream():
    data = np.load(require_cifar10() / "test.npz")
    rng = np.random.default_rng(0)
    index = rng.permutation(len(data["y"]))[:512]
    clean = data["x"][index].astype(np.float32)
    noisy = np.clip(clean + rng.normal(0, 0.1 * 255, clean.shape), 0, 255).astype(np.uint8)
    return [png_bytes(im) for im in noisy], data["y"][index]


@pytest.fixture(scope="module")
def bundled_server():
    model = require_bundled_model()
    with running_server(Settings(model=model, max_batch_wait_ms=1.0)) as server:
        yield server


def _error(server, stream, policy, images, labels, batch):
    client = TTAClient(server.url)
    wrong = 0
    for i in range(0, len(images), batch):
        out = client.predict(stream, images[i : i + batch], policy=policy)
        wrong += sum(p.label != int(y) for p, y in zip(out.predictions, labels[i : i + batch], strict=True))  # fmt: skip
    return wrong / len(images)


def test_bn_and_default_beat_source_on_a_shifted_stream(bundled_server, shifted_stream):
    images, labels = shifted_stream
    source = _error(bundled_server, "noise-source", "source", images, labels, 64)
    bn = _error(bundled_server, "noise-bn", "bn", images, labels, 64)
    default = _error(bundled_server, "noise-default", "default", images, labels, 64)
    print(f"error on gaussian-noise CIFAR-10 (512 images, batch 64): source {source:.3f} bn {bn:.3f} default {default:.3f}")  # fmt: skip
    assert bn < source - 0.05
    assert default < source - 0.05


def test_single_image_stream_adapts(bundled_server, shifted_stream):
    images, labels = shifted_stream
    source = _error(bundled_server, "single-source", "source", images[:256], labels[:256], 1)
    bn = _error(bundled_server, "single-bn", "bn", images[:256], labels[:256], 1)
    print(f"error on single-image stream (256 images): source {source:.3f} bn {bn:.3f}")
    assert bn < source - 0.03
