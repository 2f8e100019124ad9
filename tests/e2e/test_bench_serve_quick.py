"""`ttaserve bench serve` end to end (real server processes), the copy-per-stream baseline,
and the target arithmetic."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import httpx
import pytest

from conftest import ServerThread, free_port, random_images
from ttaserve.clients import copy_per_stream
from ttaserve.clients.bench_serve import evaluate_targets, main, parse_metrics
from ttaserve.clients.client import TTAClient


def test_quick_bench_writes_sane_results(random_package: Path, tmp_path: Path) -> None:
    out = tmp_path / "serve"
    assert main(["--quick", "--model", str(random_package), "--out", str(out)]) == 0
    report = json.loads((out / "serve.json").read_text())
    markdown = (out / "serve.md").read_text()
    assert list(report["results"]) == ["source", "bn"]
    for name, result in report["results"].items():
        workloads = {(p["streams"], p["images_per_request"]) for p in result["phases"]}
        assert workloads >= {(1, 1), (1, 32), (8, 1), (8, 32)}, name
        for p in result["phases"]:
            assert p["errors"] == 0, p["first_error"]
            assert p["images_per_s"] > 0 and p["requests_per_s"] > 0
            assert 0 < p["p50_ms"] <= p["p95_ms"] <= p["p99_ms"]
            assert p["mean_batch_images"] >= 1 and p["forward_ms_per_image"] > 0
            assert p["server_rss_bytes"] > 0 and p["bound"]
        assert result["memory"]["state_bytes"] > 0
    assert (1, 64) in {(p["streams"], p["images_per_request"]) for p in report["results"]["bn"]["phases"]}  # fmt: skip
    targets = {t["target"]: t["status"] for t in report["targets"]}
    assert set(targets.values()) <= {"PASS", "FAIL", "SKIP"}
    assert targets["state bytes per stream <= 2x the model's BN statistics (bn)"] == "PASS"
    assert "## Targets" in markdown and "| source | 8 | 32 |" in markdown
    assert (out / "logs" / "bn.log").is_file()


def test_copy_per_stream_baseline_matches_bn_on_a_fresh_stream(server, random_model) -> None:
    """Same route shape, same policy: its first answer equals ttaserve's; state is per copy."""
    baseline = ServerThread(copy_per_stream.create_app(random_model, "bn"), free_port())
    baseline.start()
    try:
        images = random_images(4, seed=7)
        with TTAClient(baseline.url) as copy_client, TTAClient(server.url) as client:
            ours = client.predict("s1", images)
            theirs = copy_client.predict("s1", images)
            for a, b in zip(ours.predictions, theirs.predictions, strict=True):
                assert a.label == b.label and a.score == pytest.approx(b.score, abs=1e-4)
            assert copy_client.predict("s1", images[:1]).adaptation.samples_seen == 5
            summary = httpx.get(f"{baseline.url}/v1/streams/s1").json()
            params = sum(p.numel() * 4 for p in random_model.module.parameters())
            assert summary["state_bytes"] > params  # a whole model copy per stream
            metrics = parse_metrics(httpx.get(f"{baseline.url}/metrics").text)
            assert metrics["ttaserve_batch_size_images_sum"] == 5
    finally:
        baseline.stop()


def _phase(config: str, streams: int, images: int, **figures: float) -> dict:
    base = {"images_per_s": 100.0, "mean_batch_images": 1.0, "forward_ms_per_image": 1.0}
    return {"config": config, "streams": streams, "images_per_request": images} | base | figures


def test_targets_pass_and_fail_from_figures() -> None:
    opts = argparse.Namespace(concurrencies=[1, 64], sizes=[1], reference_batch=64)
    memory = {"state_bytes": 900, "rss_per_stream_bytes": 1000.0}
    results = {
        "source": {"phases": [_phase("source", 1, 1), _phase("source", 64, 1)]},
        "bn": {
            "phases": [
                _phase("bn", 1, 1, images_per_s=95.0),
                _phase("bn", 64, 1, mean_batch_images=20.0, forward_ms_per_image=1.2),
                _phase("bn", 1, 64),
            ],
            "memory": memory,
        },
        "bn_unbatched": {"phases": [_phase("bn_unbatched", 64, 1, images_per_s=50.0)]},
        "bn_redis": {"phases": [_phase("bn_redis", 64, 1, images_per_s=70.0)]},
        "copy_per_stream": {"memory": {"state_bytes": 10**6, "rss_per_stream_bytes": 2e6}},
    }
    status = [t["status"] for t in evaluate_targets(results, opts, bn_statistics_bytes=500)]
    # bn, default(skip), batch, model time, unbatched, state bytes, memory, redis (0.7x)
    assert status == ["PASS", "SKIP", "PASS", "PASS", "PASS", "PASS", "PASS", "FAIL"]


def test_targets_take_the_median_of_ratios_paired_within_rounds() -> None:
    """Three rounds: one noisy round neither fails nor passes a target on its own; each
    ratio pairs phases of the same round."""
    opts = argparse.Namespace(concurrencies=[1], sizes=[1], reference_batch=0)

    def rounds(config: str, speeds: list[float]) -> list[dict]:
        return [_phase(config, 1, 1, images_per_s=v) | {"round": r} for r, v in enumerate(speeds)]

    # source drifts from round to round; bn keeps 0.95x of it except in round 1 (0.5x)
    source = [100.0, 200.0, 50.0]
    results = {
        "source": {"phases": rounds("source", source)},
        "bn": {"phases": rounds("bn", [95.0, 100.0, 47.5])},
        "default": {"phases": rounds("default", [85.0, 190.0, 42.5])},  # 0.85, 0.95, 0.85
    }
    bn, default = evaluate_targets(results, opts, bn_statistics_bytes=500)[:2]
    assert bn["status"] == "PASS" and "0.95 (0.50-0.95)" in bn["detail"]
    assert "lowest single round 0.50" in bn["detail"]
    assert default["status"] == "FAIL" and "0.85 (0.85-0.95)" in default["detail"]
    # a round measured on one side only is not paired: bn's round 0 alone
    results["bn"]["phases"] = results["bn"]["phases"][:1]
    bn = evaluate_targets(results, opts, 500)[0]
    assert bn["status"] == "PASS" and "lowest single round 0.95" in bn["detail"]


def test_a_round_without_forwards_leaves_the_model_time_target_to_the_others() -> None:
    """A round whose window saw no forward pass (every request failed) has no model time:
    the target pairs the rounds that have one instead of failing on it."""
    opts = argparse.Namespace(concurrencies=[64], sizes=[1], reference_batch=64)

    def bn(streams: int, images: int, ms: list[float | None]) -> list[dict]:
        return [_phase("bn", streams, images, forward_ms_per_image=v) | {"round": r} for r, v in enumerate(ms)]  # fmt: skip

    results = {"bn": {"phases": bn(64, 1, [1.2, None, 1.1]) + bn(1, 64, [1.0, 1.0, 1.0])}}
    model_time = evaluate_targets(results, opts, bn_statistics_bytes=500)[3]
    assert model_time["status"] == "PASS", model_time
    assert model_time["detail"].startswith("1.150 vs 1.000 ms/image; ratio 1.15 (1.10-1.20)x")
