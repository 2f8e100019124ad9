"""`ttaserve bench accuracy` end to end on a tiny synthetic set and the random test model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from ttaserve.bench.accuracy import main
from ttaserve.bench.corruptions import cached_corrupt_images, corrupt_images
from ttaserve.bench.scenarios import SCENARIOS


def write_labelled_set(path: Path, per_class: int = 6, seed: int = 0) -> Path:
    """A small CIFAR-shaped npz: smooth random images, 10 classes."""
    rng = np.random.default_rng(seed)
    n = 10 * per_class
    base = rng.integers(0, 256, (n, 4, 4, 3)).astype(np.uint8)
    x = base.repeat(8, axis=1).repeat(8, axis=2)  # 32x32 blocks: not pure noise
    y = np.repeat(np.arange(10), per_class).astype(np.int64)
    np.savez(path, x=x, y=y)
    return path


def bench_args(package: Path, tmp_path: Path, *options: str) -> tuple[list[str], Path]:
    """Arguments for a run on the tiny set and `package`, writing under `tmp_path`; and
    the output folder."""
    data = write_labelled_set(tmp_path / "tiny.npz")
    out = tmp_path / "results"
    common = ["--data", str(data), "--model", str(package), "--out", str(out), "--cache", str(tmp_path / "cache")]  # fmt: skip
    return [*common, *options], out


def test_bench_accuracy_writes_reports(random_package: Path, tmp_path: Path) -> None:
    data = write_labelled_set(tmp_path / "tiny.npz")
    out = tmp_path / "results"
    argv = [
        "--data", str(data), "--model", str(random_package), "--policies", "source,bn",
        "--corruptions", "gaussian_noise", "--per-class", "4", "--single-per-class", "2",
        "--long-per-class", "2", "--threads", "1", "--out", str(out),
        "--cache", str(tmp_path / "cache"),
    ]  # fmt: skip
    assert main(argv) == 0
    report = json.loads((out / "accuracy.json").read_text())
    markdown = (out / "accuracy.md").read_text()
    assert (out / "running_accuracy.png").stat().st_size > 1000
    assert list(report["results"]) == ["source", "bn"]
    for by_scenario in report["results"].values():
        assert list(by_scenario) == list(SCENARIOS)
        for scenario, figures in by_scenario.items():
            assert 0 <= figures["mean_corrupted"] <= 100, scenario
            for name, domain in figures["domains"].items():
                assert 0 <= domain["accuracy"] <= 100, (scenario, name)
            assert figures["seconds"] > 0
        assert 0 <= by_scenario["open_set"]["mean_auroc"] <= 1
        long = by_scenario["continual_long"]["long"]
        assert len(long["pass_accuracy"]) == 10
        assert all(0 <= a <= 100 for _, a in long["running"])
    # the frozen model answers the same in every scenario that shows it the same images
    source = report["results"]["source"]
    assert source["iid"]["domains"] == source["correlated"]["domains"]
    assert "| policy | iid | correlated |" in markdown
    assert "### continual_long" in markdown
    assert list(report["targets"]) == []  # no `default` policy in this run
    assert any((tmp_path / "cache").glob("gaussian_noise-s5-*.npz"))


def test_bench_accuracy_checks_the_default_policy_targets(random_package: Path, tmp_path: Path) -> None:  # fmt: skip
    argv, out = bench_args(
        random_package, tmp_path, "--policies", "default,source",
        "--scenarios", "iid,single,continual_long", "--corruptions", "contrast",
        "--per-class", "3", "--single-per-class", "2", "--long-per-class", "1", "--threads", "1",
    )  # fmt: skip
    assert main(argv) == 0
    targets = json.loads((out / "accuracy.json").read_text())["targets"]
    assert set(targets) == {"iid", "single", "continual_long"}
    assert "single keeps >= 90% of iid gain" in targets["single"]
    assert "no collapse (last tenth >= first - 2)" in targets["continual_long"]
    assert "clean within 0.5 of source" in targets["iid"]
    assert all(isinstance(c["met"], bool) for checks in targets.values() for c in checks.values())
    assert "## Targets of `default`" in (out / "accuracy.md").read_text()


def test_unknown_policy_fails_with_a_clear_message(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--policies", "source,no-such-policy"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "unknown policy no-such-policy" in err
    assert "source" in err


def test_unknown_scenario_and_corruption_fail(capsys: pytest.CaptureFixture[str]) -> None:
    for option, name in (("--scenarios", "sideways"), ("--corruptions", "rain")):
        with pytest.raises(SystemExit):
            main([option, name])
        assert name in capsys.readouterr().err


def test_corruptions_are_deterministic_and_cached(tmp_path: Path) -> None:
    images = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    for name in ("impulse_noise", "fog", "glass_blur"):  # the three that needed shims
        once = corrupt_images(images, name, 3)
        assert once.shape == images.shape
        assert once.dtype == np.uint8
        assert not np.array_equal(once, images)
        # the same image gets the same corruption wherever it stands
        np.testing.assert_array_equal(corrupt_images(images[::-1].copy(), name, 3)[::-1], once)
    first = cached_corrupt_images(images, "contrast", 5, tmp_path)
    (path,) = tmp_path.glob("contrast-s5-*.npz")
    np.savez(path, x=np.zeros_like(images))  # a cache hit must be read, not recomputed
    assert not cached_corrupt_images(images, "contrast", 5, tmp_path).any()
    assert first.any()


def test_worker_processes_give_the_numbers_of_a_serial_run(random_package: Path, tmp_path: Path) -> None:  # fmt: skip
    data = write_labelled_set(tmp_path / "tiny.npz")
    common = [
        "--data", str(data), "--model", str(random_package), "--policies", "source,bn,default",
        "--scenarios", "iid,single,continual", "--corruptions", "gaussian_noise",
        "--per-class", "4", "--single-per-class", "2", "--threads", "2",
        "--cache", str(tmp_path / "cache"),
    ]  # fmt: skip
    reports = []
    for jobs in ("1", "2"):
        out = tmp_path / f"jobs{jobs}"
        assert main([*common, "--jobs", jobs, "--out", str(out)]) == 0
        results = json.loads((out / "accuracy.json").read_text())["results"]
        for by_scenario in results.values():
            for figures in by_scenario.values():
                figures.pop("seconds")
        reports.append(results)
    assert list(reports[0]) == list(reports[1]) == ["source", "bn", "default"]
    assert reports[0] == reports[1]


def test_bench_accuracy_variants_reach_the_worker_processes(random_package: Path, tmp_path: Path) -> None:  # fmt: skip
    """`--variant` with `--jobs 2`: a `bn` variant with alpha 0 answers like the frozen model."""
    from ttaserve.adapters.registry import POLICIES

    options = ["--scenarios", "iid", "--corruptions", "gaussian_noise", "--per-class", "4"]
    argv, out = bench_args(
        random_package, tmp_path, *options, "--policies", "source,frozen_bn",
        "--variant", "frozen_bn=bn:alpha=0.0", "--threads", "2", "--jobs", "2",
    )  # fmt: skip
    try:
        assert main(argv) == 0
    finally:
        POLICIES.pop("frozen_bn", None)
    results = json.loads((out / "accuracy.json").read_text())["results"]
    frozen = results["frozen_bn"]["iid"]["domains"]
    # the same answers on every image: a gap to source of 0 with a paired error of 0
    assert all(domain.pop("se_vs_source") == 0.0 for domain in frozen.values())
    assert frozen == results["source"]["iid"]["domains"]
    with pytest.raises(SystemExit):
        main([*bench_args(random_package, tmp_path, *options)[0], "--variant", "broken=bn:alpha=2.0"])  # outside [0, 1]: a usage error  # fmt: skip
    assert "broken" not in POLICIES
