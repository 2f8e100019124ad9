"""The Python clients against a real in-thread server: predict, stream management, errors."""

from __future__ import annotations

import httpx
import numpy as np
import pytest

from conftest import png_bytes, random_images
from ttaserve.clients.client import (
    AsyncTTAClient,
    PredictResult,
    TTAClient,
    TTAServerError,
    encode_image,
)


@pytest.fixture
def client(server):
    with TTAClient(server.url, max_retry_wait_s=0.01) as c:
        yield c


def test_predict_bytes_arrays_and_paths(client, tmp_path):
    images = random_images(3, seed=2)
    result = client.predict("cam-a", png_bytes(images[0]), top_k=3)
    assert isinstance(result, PredictResult)
    (p,) = result.predictions
    assert len(p.top_k) == 3 and p.top_k[0].label == p.label and 0 <= p.score <= 1
    assert p.class_name == p.top_k[0].class_name and isinstance(p.open_set, bool)
    a = result.adaptation
    assert (a.policy, a.samples_seen, a.state_version, a.degraded, a.reset) == ("default", 1, 1, False, False)  # fmt: skip
    assert a.open_set == sum(q.open_set for q in result.predictions)
    path = tmp_path / "frame.png"
    path.write_bytes(png_bytes(images[2]))
    result = client.predict("cam-a", [images[0], images[1], str(path)], group="lobby")
    assert len(result.predictions) == 3 and result.adaptation.samples_seen == 4
    # the same image gives the same answer whether sent as array or as PNG bytes
    fresh = [client.predict(s, x).predictions[0] for s, x in [("cam-b", images[0]), ("cam-c", png_bytes(images[0]))]]  # fmt: skip
    assert fresh[0] == fresh[1]


def test_reset_summary_delete(client):
    client.predict("cam-r", random_images(2, seed=3), policy="source")
    summary = client.summary("cam-r")
    assert (summary.stream_id, summary.policy, summary.samples_seen) == ("cam-r", "source", 2)
    assert summary.state_bytes > 0 and summary.updates == 1
    reset = client.reset("cam-r", policy="bn")
    assert (reset.policy, reset.samples_seen, reset.resets) == ("bn", 0, 1)
    assert client.delete("cam-r") is True
    assert client.delete("cam-r", missing_ok=True) is False
    with pytest.raises(TTAServerError) as info:
        client.summary("cam-r")
    assert (info.value.status, info.value.code) == (404, "stream_not_found")


def test_errors_map_to_server_error(client):
    with pytest.raises(TTAServerError) as info:
        client.predict("cam-e", b"definitely not an image")
    assert info.value.status == 422 and info.value.code and info.value.message
    client.predict("cam-e", random_images(1)[0])  # the stream still works afterwards
    with pytest.raises(TTAServerError) as info:
        client.predict("cam-e", random_images(1)[0], policy="tent")
    assert (info.value.status, info.value.code) == (409, "policy_conflict")
    with pytest.raises(TTAServerError) as info:
        client.predict("cam-e", random_images(1)[0], policy="no-such-policy")
    assert info.value.code == "unknown_policy"


def test_health_ready_and_model_info(client):
    assert client.health() and client.ready()
    info = client.model_info()
    assert info["name"] == "tiny-test" and "bn" in info["policies"]
    assert not TTAClient("http://127.0.0.1:9", timeout_s=0.5).ready()


def test_503_is_retried_honouring_retry_after():
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        if len(calls) < 3:
            body = {"error": {"code": "overloaded", "message": "retry later"}}
            return httpx.Response(503, json=body, headers={"Retry-After": "0"})
        return httpx.Response(200, json={"live": True})

    http = httpx.Client(base_url="http://test", transport=httpx.MockTransport(handler))
    client = TTAClient("http://test", http=http, max_retries=2)
    assert client.model_info() == {"live": True} and len(calls) == 3
    calls.clear()
    client.max_retries = 1
    with pytest.raises(TTAServerError) as info:
        client.model_info()
    assert (info.value.status, info.value.code, len(calls)) == (503, "overloaded", 2)


def test_encode_image_rejects_unusable_inputs():
    with pytest.raises(ValueError, match="uint8"):
        encode_image(np.zeros((4, 4, 3), dtype=np.float32))
    with pytest.raises(TypeError):
        encode_image(3.5)  # type: ignore[arg-type]


async def test_async_client(server):
    async with AsyncTTAClient(server.url) as client:
        assert await client.ready()
        result = await client.predict("cam-async", list(random_images(2, seed=4)))
        assert len(result.predictions) == 2 and result.adaptation.samples_seen == 2
        assert (await client.summary("cam-async")).samples_seen == 2
        assert (await client.reset("cam-async")).samples_seen == 0
        assert await client.delete("cam-async")
        with pytest.raises(TTAServerError) as info:
            await client.delete("cam-async")
        assert info.value.status == 404
