"""Scenario streams of the accuracy benchmark, on synthetic labels."""

from __future__ import annotations

import numpy as np
import pytest

from ttaserve.bench.scenarios import (
    ACROSS_CORRUPTION_SCENARIOS,
    BATCH_SIZE,
    LONG_PASSES,
    PER_CORRUPTION_SCENARIOS,
    across_corruption_stream,
    dirichlet_order,
    iid_order,
    longtail_counts,
    longtail_order,
    online_label_shift_order,
    per_corruption_stream,
    scenario_rng,
)

CLASSES = 10


def balanced_labels(per_class: int = 100) -> np.ndarray:
    return np.random.default_rng(123).permutation(np.repeat(np.arange(CLASSES), per_class))


def mean_run_length(labels: np.ndarray) -> float:
    """Average length of runs of equal consecutive labels."""
    changes = np.count_nonzero(labels[1:] != labels[:-1])
    return len(labels) / (changes + 1)


def test_dirichlet_order_is_class_correlated() -> None:
    labels = balanced_labels()
    iid = labels[iid_order(labels, scenario_rng(0, "iid"))]
    correlated = labels[dirichlet_order(labels, scenario_rng(0, "correlated"))]
    assert mean_run_length(iid) < 1.5
    assert mean_run_length(correlated) > 10 * mean_run_length(iid)
    # most 64-batches are dominated by one or two classes
    majority = [np.bincount(b, minlength=CLASSES).max() / len(b) for b in np.array_split(correlated, len(correlated) // 64)]  # fmt: skip
    assert np.median(majority) > 0.5


def test_dirichlet_order_is_a_permutation() -> None:
    labels = balanced_labels()
    order = dirichlet_order(labels, scenario_rng(1, "correlated"))
    assert sorted(order) == list(range(len(labels)))


def test_dirichlet_order_works_on_tiny_sets() -> None:
    labels = np.repeat(np.arange(CLASSES), 2)
    order = dirichlet_order(labels, scenario_rng(0, "correlated"))
    assert sorted(order) == list(range(len(labels)))


@pytest.mark.parametrize("ratio", [10, 100])
def test_longtail_counts_follow_the_imbalance_profile(ratio: int) -> None:
    labels = balanced_labels(200)
    order = longtail_order(labels, scenario_rng(0, f"longtail_ir{ratio}"), ratio)
    counts = np.sort(np.bincount(labels[order], minlength=CLASSES))[::-1]
    expected = longtail_counts(200, CLASSES, ratio)
    assert counts.tolist() == expected.tolist()
    assert expected[0] == 200
    assert expected[-1] == 200 // ratio
    ranks = np.arange(CLASSES) / (CLASSES - 1)
    np.testing.assert_allclose(expected, 200 * ratio ** (-ranks), atol=1.0)
    assert len(set(order.tolist())) == len(order)


def test_longtail_class_ranking_is_random_per_seed() -> None:
    labels = balanced_labels(200)
    firsts = set()
    for seed in range(8):
        order = longtail_order(labels, scenario_rng(seed, "longtail_ir10"), 10)
        firsts.add(int(np.bincount(labels[order]).argmax()))
    assert len(firsts) > 1


def test_online_label_shift_phases_have_their_major_class() -> None:
    labels = balanced_labels(100)
    order = online_label_shift_order(labels, scenario_rng(0, "online_label_shift"), 5000)
    assert sorted(order) == list(range(len(labels)))
    phases = np.array_split(labels[order], CLASSES)
    majors = []
    for phase in phases:
        counts = np.bincount(phase, minlength=CLASSES)
        majors.append(int(counts.argmax()))
        assert counts.max() / len(phase) > 0.9
    assert sorted(majors) == list(range(CLASSES))  # every class leads exactly one phase


def test_online_label_shift_class_order_is_shuffled() -> None:
    labels = balanced_labels(50)
    leaders = {
        tuple(
            int(np.bincount(p, minlength=CLASSES).argmax())
            for p in np.array_split(
                labels[online_label_shift_order(labels, scenario_rng(s, "ols"), 5000)], CLASSES
            )
        )  # fmt: skip
        for s in range(4)
    }
    assert len(leaders) > 1


def test_online_label_shift_with_ir_one_is_close_to_iid() -> None:
    labels = balanced_labels(100)
    order = online_label_shift_order(labels, scenario_rng(0, "ols"), 1.0)
    first_phase = np.bincount(labels[order][:100], minlength=CLASSES)
    assert first_phase.max() < 40


@pytest.mark.parametrize("scenario", PER_CORRUPTION_SCENARIOS)
def test_per_corruption_streams_use_each_index_at_most_once(scenario: str) -> None:
    labels = balanced_labels(30)
    stream = per_corruption_stream(scenario, labels, seed=0, open_set_pool=500)
    known = stream.index[~stream.unknown]
    assert len(set(known.tolist())) == len(known)
    assert known.min() >= 0
    assert known.max() < len(labels)
    if scenario in ("iid", "correlated", "single", "open_set", "online_label_shift"):
        assert len(known) == len(labels)
    unknown = stream.index[stream.unknown]
    assert len(set(unknown.tolist())) == len(unknown)  # the pool is large enough here
    assert (stream.domain == 0).all()


@pytest.mark.parametrize("scenario", PER_CORRUPTION_SCENARIOS)
def test_per_corruption_batch_sizes(scenario: str) -> None:
    labels = balanced_labels(30)
    stream = per_corruption_stream(scenario, labels, seed=0, open_set_pool=500)
    sizes = [s.stop - s.start for s in stream.requests()]
    expected = 1 if scenario == "single" else BATCH_SIZE
    assert all(size == expected for size in sizes[:-1])
    assert 1 <= sizes[-1] <= expected
    assert sum(sizes) == len(stream)
    assert len(sizes) == stream.num_requests


def test_open_set_batches_hold_twenty_percent_unknowns() -> None:
    labels = balanced_labels(50)
    stream = per_corruption_stream("open_set", labels, seed=0, open_set_pool=1000)
    for rows in list(stream.requests())[:-1]:
        assert stream.unknown[rows].sum() == round(0.2 * BATCH_SIZE)
    assert 0.18 < stream.unknown.mean() < 0.22
    first = np.flatnonzero(stream.unknown[:BATCH_SIZE])
    assert first.tolist() != list(range(BATCH_SIZE - len(first), BATCH_SIZE))  # mixed in


def test_open_set_reuses_a_small_pool_only_when_exhausted() -> None:
    labels = balanced_labels(50)
    stream = per_corruption_stream("open_set", labels, seed=0, open_set_pool=20)
    unknown = stream.index[stream.unknown]
    counts = np.bincount(unknown, minlength=20)
    assert len(counts) == 20
    assert counts.max() - counts.min() <= 1  # every pool image used before any is reused


def test_streams_are_reproducible_and_seed_dependent() -> None:
    labels = balanced_labels(30)
    for scenario in PER_CORRUPTION_SCENARIOS:
        a = per_corruption_stream(scenario, labels, seed=3, open_set_pool=100)
        b = per_corruption_stream(scenario, labels, seed=3, open_set_pool=100)
        c = per_corruption_stream(scenario, labels, seed=4, open_set_pool=100)
        assert np.array_equal(a.index, b.index)
        assert np.array_equal(a.unknown, b.unknown)
        assert not np.array_equal(a.index, c.index)


@pytest.mark.parametrize("scenario", ACROSS_CORRUPTION_SCENARIOS)
def test_across_corruption_streams_visit_each_pair_at_most_once_per_pass(scenario: str) -> None:
    labels = balanced_labels(20)  # 200 images: continual streams keep 192 per corruption
    domains = 4
    stream = across_corruption_stream(scenario, labels, domains, seed=0)
    passes = LONG_PASSES if scenario == "continual_long" else 1
    per_domain = len(labels) if scenario == "mixed" else len(labels) - len(labels) % BATCH_SIZE
    assert stream.passes == passes
    assert len(stream) == passes * domains * per_domain
    per_pass = per_domain * domains
    for p in range(passes):
        rows = slice(p * per_pass, (p + 1) * per_pass)
        pairs = set(zip(stream.domain[rows].tolist(), stream.index[rows].tolist(), strict=True))
        assert len(pairs) == per_pass
    sizes = [s.stop - s.start for s in stream.requests()]
    assert all(size == BATCH_SIZE for size in sizes[:-1])
    if scenario != "mixed":  # whole batches per corruption: no batch straddles two
        assert all(len(set(stream.domain[s].tolist())) == 1 for s in stream.requests())


def test_continual_visits_corruptions_in_order() -> None:
    labels = balanced_labels(20)
    stream = across_corruption_stream("continual", labels, 3, seed=0)
    assert stream.domain.tolist() == sorted(stream.domain.tolist())
    long = across_corruption_stream("continual_long", labels, 3, seed=0)
    first_pass = long.domain[: len(long) // LONG_PASSES]
    assert np.array_equal(long.domain, np.tile(first_pass, LONG_PASSES))


def test_mixed_interleaves_corruptions() -> None:
    labels = balanced_labels(20)
    stream = across_corruption_stream("mixed", labels, 5, seed=0)
    first_batch = stream.domain[:BATCH_SIZE]
    assert len(set(first_batch.tolist())) == 5


def test_unknown_scenarios_are_rejected() -> None:
    labels = balanced_labels(5)
    with pytest.raises(ValueError, match="per-corruption"):
        per_corruption_stream("continual", labels, seed=0)
    with pytest.raises(ValueError, match="across-corruption"):
        across_corruption_stream("iid", labels, 2, seed=0)
