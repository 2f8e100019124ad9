import math

import numpy as np
import pytest

from ttaserve.bench.replay import StreamOutcome
from ttaserve.bench.scenarios import Stream
from ttaserve.bench.summary import Run, mean_gap_error, paired_standard_error, summarize
from ttaserve.bench.targets import best_on_average, clean_within, every_corruption


def _figures(clean: float, **corrupted: float) -> dict:
    domains = {"clean": {"accuracy": clean, "images": 100}}
    domains |= {name: {"accuracy": acc, "images": 72} for name, acc in corrupted.items()}
    return {"domains": domains, "clean": clean}


def test_corruption_target_names_the_worst_gap_and_the_images_it_stands_on():
    source = _figures(90.0, fog=40.0, jpeg_compression=60.0)
    check = every_corruption(_figures(90.0, fog=55.0, jpeg_compression=58.6), source)
    assert not check["met"]
    assert check["detail"] == "worst jpeg_compression -1.4 (72 images); below on jpeg_compression"  # fmt: skip
    assert every_corruption(_figures(90.0, fog=55.0, jpeg_compression=61.0), source)["met"]


def test_clean_target_allows_half_a_point_and_says_on_how_many_images():
    source = _figures(90.0)
    assert clean_within(_figures(89.5), source) == {"met": True, "detail": "clean -0.5 vs source (100 images)"}  # fmt: skip
    assert not clean_within(_figures(89.0), source)["met"]


def test_paired_standard_error_of_an_accuracy_gap():
    mine, base = np.array([1, 1, 0, 0], bool), np.array([1, 0, 0, 0], bool)
    # per-image differences 0, 1, 0, 0: standard deviation 0.5 over sqrt(4) images
    assert paired_standard_error(mine, base) == pytest.approx(25.0)
    assert paired_standard_error(mine, mine) == 0.0  # the same answers: no doubt about the gap
    assert math.isnan(paired_standard_error(mine[:1], base[:1]))
    assert math.isnan(paired_standard_error(mine, base[:3]))


def _run(policy: str, stream: Stream, labels: np.ndarray, predicted: list[int]) -> Run:
    outcome = StreamOutcome(np.array(predicted), np.zeros(len(predicted)), resets=0, seconds=0.0)
    return Run(policy, "iid", ("fog",), labels, stream, outcome)


def test_summarize_pairs_each_policy_with_the_source_run_of_the_same_stream():
    labels = np.array([0, 1, 2, 3])
    n = len(labels)
    stream = Stream(np.arange(n), np.zeros(n, int), np.zeros(n, bool), batch_size=2)
    other = Stream(np.arange(n), np.zeros(n, int), np.zeros(n, bool), batch_size=2)
    runs = [
        _run("source", stream, labels, [0, 9, 9, 9]),
        _run("default", stream, labels, [0, 1, 9, 9]),
        _run("bn", other, labels, [0, 1, 9, 9]),  # no source run of its stream: no pair
    ]
    results = summarize(runs)
    fog = results["default"]["iid"]["domains"]["fog"]
    assert fog["accuracy"] == 50.0
    assert fog["se_vs_source"] == pytest.approx(25.0)
    assert "se_vs_source" not in results["source"]["iid"]["domains"]["fog"]
    assert "se_vs_source" not in results["bn"]["iid"]["domains"]["fog"]


def test_target_details_give_the_standard_error_of_the_gap_where_known():
    source = _figures(90.0, jpeg_compression=60.0)
    mine = _figures(88.0, jpeg_compression=58.6)
    mine["domains"]["jpeg_compression"]["se_vs_source"] = 2.04
    mine["domains"]["clean"]["se_vs_source"] = 0.96
    check = every_corruption(mine, source)
    assert check["detail"] == "worst jpeg_compression -1.4 ± 2.0 (72 images); below on jpeg_compression"  # fmt: skip
    assert not check["met"]  # the error is information: it never turns a miss into a pass
    assert clean_within(mine, source)["detail"] == "clean -2.0 ± 1.0 vs source (100 images)"


def test_the_error_of_a_gap_between_means_adds_the_corruptions_errors_as_independent():
    labels = np.array([0, 1, 2, 3])
    n = len(labels)
    streams = [Stream(np.arange(n), np.zeros(n, int), np.zeros(n, bool), batch_size=2) for _ in range(3)]  # fmt: skip
    answers = {"source": [0, 9, 9, 9], "default": [0, 1, 9, 9]}  # 25 points apart, SE 25 each
    runs = [
        Run(
            policy,
            "iid",
            (domain,),
            labels,
            stream,
            StreamOutcome(np.array(answer), np.zeros(n), 0, 0.0),
        )  # fmt: skip
        for policy, answer in answers.items()
        for domain, stream in zip(("clean", "fog", "snow"), streams, strict=True)
    ]
    mine = [r for r in runs if r.policy == "default"]
    theirs = {id(r.stream): r for r in runs if r.policy == "source"}
    # two corruptions (clean is not in the headline mean): sqrt(25^2 + 25^2) / 2
    assert mean_gap_error(mine, theirs) == pytest.approx(25.0 / math.sqrt(2))
    assert math.isnan(mean_gap_error(mine, {}))  # no counterpart: unknown, not zero
    results = summarize(runs, candidate="default")
    assert results["default"]["iid"]["se_vs"] == {"source": pytest.approx(25.0 / math.sqrt(2))}
    assert "se_vs" not in results["source"]["iid"]
    check = best_on_average("default", results, "iid")
    assert check["met"] and check["detail"] == "+25.0 ± 17.7 vs best other (source)"
