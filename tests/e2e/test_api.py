"""The HTTP API through a real server: body formats, stream management, health, metrics,
and bad input that must leave every stream's state byte-for-byte unchanged."""

import base64
import io

import httpx
import numpy as np
import pytest
from PIL import Image

from conftest import png_bytes, png_claiming_size, random_images


def _predict(server, stream, **kwargs):
    return httpx.post(f"{server.url}/v1/streams/{stream}/predict", timeout=30, **kwargs)


def _stored_blob(server, stream):
    """The raw stored record of a stream, read from the server's own store."""
    dataplane = server.app.state.dataplane
    import asyncio

    (record,) = asyncio.run(dataplane.store.get_many([dataplane.key(stream)]))
    return None if record is None else (record.version, record.data)


def test_predict_raw_png_and_jpeg(server):
    image = random_images(1)[0]
    r = _predict(server, "cam-1", content=png_bytes(image), headers={"content-type": "image/png"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert len(body["predictions"]) == 1
    p = body["predictions"][0]
    assert set(p) >= {"label", "class_name", "score", "top_k", "open_set"}
    assert len(p["top_k"]) == 5 and p["top_k"][0]["label"] == p["label"]
    assert body["adaptation"] == {"policy": "default", "samples_seen": 1, "state_version": 1, "degraded": False, "reset": False}  # fmt: skip
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG")
    r = _predict(server, "cam-1", content=buf.getvalue(), headers={"content-type": "image/jpeg"})
    assert r.status_code == 200 and r.json()["adaptation"]["samples_seen"] == 2


def test_predict_multipart_several_files_and_json_base64(server):
    images = random_images(3, seed=1)
    files = [("images", (f"{i}.png", png_bytes(im), "image/png")) for i, im in enumerate(images)]
    r = _predict(server, "cam-2", files=files, params={"top_k": 2})
    assert r.status_code == 200, r.text
    assert len(r.json()["predictions"]) == 3 and len(r.json()["predictions"][0]["top_k"]) == 2
    payload = {"images": [base64.b64encode(png_bytes(im)).decode() for im in images]}
    r = _predict(server, "cam-2", json=payload)
    assert r.status_code == 200, r.text
    assert r.json()["adaptation"]["samples_seen"] == 6


def test_summary_reset_delete(server):
    assert httpx.get(f"{server.url}/v1/streams/cam-3").status_code == 404
    _predict(server, "cam-3", files=[("images", png_bytes(random_images(1)[0]))], params={"policy": "source"})  # fmt: skip
    summary = httpx.get(f"{server.url}/v1/streams/cam-3").json()
    assert summary["policy"] == "source" and summary["samples_seen"] == 1
    # the policy is fixed at the first request
    r = _predict(server, "cam-3", files=[("images", png_bytes(random_images(1)[0]))], params={"policy": "bn"})  # fmt: skip
    assert r.status_code == 409 and r.json()["error"]["code"] == "policy_conflict"
    reset = httpx.post(f"{server.url}/v1/streams/cam-3/reset", params={"policy": "bn"}).json()
    assert reset["policy"] == "bn" and reset["samples_seen"] == 0 and reset["resets"] == 1
    assert httpx.delete(f"{server.url}/v1/streams/cam-3").status_code == 204
    assert httpx.get(f"{server.url}/v1/streams/cam-3").status_code == 404
    assert httpx.delete(f"{server.url}/v1/streams/cam-3").status_code == 404


def test_reset_returns_the_stream_to_the_source_model(server):
    image = png_bytes(random_images(1, seed=5)[0])
    first = _predict(server, "cam-r", files=[("images", image)]).json()
    for seed in range(3):  # adapt to other images
        _predict(server, "cam-r", files=[("images", png_bytes(random_images(4, seed=seed)[i])) for i in range(4)])  # fmt: skip
    httpx.post(f"{server.url}/v1/streams/cam-r/reset")
    again = _predict(server, "cam-r", files=[("images", image)]).json()
    assert again["predictions"][0]["top_k"] == first["predictions"][0]["top_k"]


def test_health_and_metrics(server):
    assert httpx.get(f"{server.url}/v2/health/live").json() == {"live": True}
    assert httpx.get(f"{server.url}/v2/health/ready").status_code == 200
    _predict(server, "cam-m", files=[("images", png_bytes(random_images(1)[0]))])
    text = httpx.get(f"{server.url}/metrics").text
    assert 'ttaserve_http_requests_total{method="POST",route="/v1/streams/{stream_id}/predict",status="200"}' in text  # fmt: skip
    assert "ttaserve_http_request_duration_seconds_bucket" in text
    assert "ttaserve_active_streams" in text
    assert "cam-m" not in text  # never a stream id as a label


def test_request_metrics_count_errors_by_status_and_route(server):
    def count(text: str, series: str) -> float:
        line = next((ln for ln in text.splitlines() if ln.startswith(series + " ")), None)
        return float(line.split()[-1]) if line else 0.0

    predict_415 = 'ttaserve_http_requests_total{method="POST",route="/v1/streams/{stream_id}/predict",status="415"}'  # fmt: skip
    unmatched_404 = 'ttaserve_http_requests_total{method="GET",route="unmatched",status="404"}'
    before = httpx.get(f"{server.url}/metrics").text
    assert _predict(server, "cam-e", content=b"x", headers={"content-type": "text/plain"}).status_code == 415  # fmt: skip
    assert httpx.get(f"{server.url}/no/such/route").status_code == 404
    after = httpx.get(f"{server.url}/metrics").text
    assert count(after, predict_415) == count(before, predict_415) + 1
    assert count(after, unmatched_404) == count(before, unmatched_404) + 1


GOOD = png_bytes(random_images(1)[0])


def _truncated_png():
    return GOOD[: len(GOOD) // 2]


def _grey_png():
    return png_bytes(np.zeros((32, 32), dtype=np.uint8))


def _bomb_png():
    return png_claiming_size(png_bytes(np.zeros((1, 1, 3), dtype=np.uint8)), 30000, 30000)


BAD_REQUESTS = {
    "undecodable": (
        {"content": b"garbage", "headers": {"content-type": "image/png"}},
        422,
        "invalid_image",
    ),  # fmt: skip
    "truncated": (
        {"content": _truncated_png(), "headers": {"content-type": "image/png"}},
        422,
        "invalid_image",
    ),  # fmt: skip
    "wrong_channels": ({"files": [("images", _grey_png())]}, 422, "wrong_channel_count"),
    "too_many_pixels": (
        {"content": _bomb_png(), "headers": {"content-type": "image/png"}},
        413,
        "image_too_large",
    ),  # fmt: skip
    "body_too_large": (
        {"content": b"x" * 300_000, "headers": {"content-type": "image/png"}},
        413,
        "body_too_large",
    ),  # fmt: skip
    "empty_body": ({"content": b"", "headers": {"content-type": "image/png"}}, 422, "empty_body"),
    "bad_json": (
        {"content": b"{not json", "headers": {"content-type": "application/json"}},
        422,
        "invalid_json",
    ),  # fmt: skip
    "bad_base64": ({"json": {"images": ["@@@"]}}, 422, "invalid_base64"),
    "no_files": ({"files": [("other", GOOD)]}, 422, "no_images"),
    "media_type": (
        {"content": GOOD, "headers": {"content-type": "text/plain"}},
        415,
        "unsupported_media_type",
    ),  # fmt: skip
    "one_bad_among_good": (
        {"files": [("images", GOOD), ("images", b"junk")]},
        422,
        "invalid_image",
    ),  # fmt: skip
    "unknown_policy": (
        {"files": [("images", GOOD)], "params": {"policy": "nope"}},
        422,
        "unknown_policy",
    ),  # fmt: skip
}


@pytest.fixture
def limited_server(random_package, random_model):
    from conftest import running_server
    from ttaserve.server.settings import Settings

    settings = Settings(model=random_package, max_body_bytes=200_000, max_image_pixels=1_000_000)
    with running_server(settings, random_model) as s:
        yield s


@pytest.mark.parametrize("case", sorted(BAD_REQUESTS))
def test_bad_input_gets_4xx_json_and_leaves_state_unchanged(limited_server, case):
    server = limited_server
    ok = _predict(server, "cam-bad", files=[("images", GOOD)])
    assert ok.status_code == 200
    before = _stored_blob(server, "cam-bad")
    kwargs, status, code = BAD_REQUESTS[case]
    r = _predict(server, "cam-bad", **kwargs)
    assert r.status_code == status, r.text
    assert r.json()["error"]["code"] == code and r.json()["error"]["message"]
    assert _stored_blob(server, "cam-bad") == before


@pytest.mark.parametrize("stream", ["has space", "x" * 129, "semi;colon", "brace{"])
def test_invalid_stream_ids_are_422(server, stream):
    r = _predict(server, stream, files=[("images", GOOD)])
    assert r.status_code in (404, 422)
    if r.status_code == 422:
        assert r.json()["error"]["code"] == "invalid_request"


def test_group_labels_are_bounded(random_package, random_model):
    from conftest import running_server
    from ttaserve.server.settings import Settings

    with running_server(Settings(model=random_package, max_groups=2), random_model) as server:
        for i, group in enumerate(["site-a", "site-b", "site-c", "bad group!"]):
            r = _predict(server, f"cam-{i}", files=[("images", GOOD)], headers={"X-Stream-Group": group})  # fmt: skip
            assert r.status_code == 200
        text = httpx.get(f"{server.url}/metrics").text
    groups = {line.split('group="')[1].split('"')[0] for line in text.splitlines() if line.startswith("ttaserve_group_images_total{")}  # fmt: skip
    assert groups == {"site-a", "site-b", "other"}
