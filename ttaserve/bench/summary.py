"""Accuracy figures of replayed streams: per domain, per scenario, and along long streams.

Accuracies are top-1 percentages over known-class samples. A scenario's headline figure
is the mean over the corruptions (the `clean` domain is reported beside it, not in it).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from ttaserve.bench.open_set import open_set_auroc
from ttaserve.bench.replay import StreamOutcome
from ttaserve.bench.scenarios import Stream

CLEAN = "clean"


@dataclass(frozen=True)
class Run:
    """One replayed stream: which policy and scenario, its samples and the answers."""

    policy: str
    scenario: str
    domains: tuple[str, ...]  # name of each domain number used by the stream
    labels: np.ndarray  # (N,) labels of the images the stream's `index` points at
    stream: Stream
    outcome: StreamOutcome

    def correct(self) -> np.ndarray:
        """(n,) bool: right answer, over known samples only (in stream order)."""
        known = ~self.stream.unknown
        return self.outcome.predicted[known] == self.labels[self.stream.index[known]]


def percent(correct: np.ndarray) -> float:
    return float(100.0 * correct.mean()) if len(correct) else float("nan")


def paired_standard_error(mine: np.ndarray, base: np.ndarray) -> float:
    """Standard error, in points, of the accuracy gap between two policies' answers on the
    same images (right/wrong per image, paired): the gap that the number of images alone
    leaves open. NaN for fewer than 2 images or unequal lengths."""
    if len(mine) != len(base) or len(mine) < 2:
        return float("nan")
    diff = mine.astype(np.float64) - base.astype(np.float64)
    return float(100.0 * diff.std(ddof=1) / np.sqrt(len(diff)))


def se_key(baseline: str) -> str:
    """The domain entry holding the paired standard error of the gap to `baseline`."""
    return f"se_vs_{baseline}"


def gap_errors(run: Run, other: Run) -> dict[str, float]:
    """Per domain of `run`, the paired standard error of its accuracy gap to `other`, a
    run of the same stream by another policy."""
    if other.stream is not run.stream:
        raise ValueError("gap errors pair two runs of the same stream")
    known = ~run.stream.unknown
    mine = run.outcome.predicted == run.labels[run.stream.index]
    theirs = other.outcome.predicted == run.labels[run.stream.index]
    errors: dict[str, float] = {}
    for number in np.unique(run.stream.domain):
        rows = (run.stream.domain == number) & known
        errors[run.domains[int(number)]] = paired_standard_error(mine[rows], theirs[rows])
    return errors


def mean_gap_error(runs: list[Run], others: dict[int, Run]) -> float:
    """Standard error of the gap between two policies' mean accuracy over corruptions (a
    scenario's headline figure), from `runs` of one policy and `others`, the other
    policy's runs by stream `id`: the corruptions' errors added as independent. NaN where a
    run has no counterpart."""
    if any(id(run.stream) not in others for run in runs):
        return float("nan")
    errors = [se for run in runs for name, se in gap_errors(run, others[id(run.stream)]).items() if name != CLEAN]  # fmt: skip
    if not errors:
        return float("nan")
    return float(np.sqrt(np.sum(np.square(errors))) / len(errors))


def domain_metrics(run: Run, baseline: Run | None = None) -> dict[str, dict[str, Any]]:
    """Accuracy (and open-set AUROC where there are unknowns) per domain of a run; with
    `baseline` (another policy's run of the same stream), the paired standard error of the
    accuracy gap to it (`se_key`)."""
    known = ~run.stream.unknown
    hits = run.outcome.predicted == run.labels[run.stream.index]
    errors = gap_errors(run, baseline) if baseline is not None else {}
    out: dict[str, dict[str, Any]] = {}
    for number in np.unique(run.stream.domain):
        in_domain = run.stream.domain == number
        entry: dict[str, Any] = {
            "accuracy": percent(hits[in_domain & known]),
            "images": int((in_domain & known).sum()),
        }
        if baseline is not None:
            entry[se_key(baseline.policy)] = errors[run.domains[int(number)]]
        if run.stream.unknown.any():
            entry["auroc"] = open_set_auroc(run.stream.unknown[in_domain], run.outcome.open_set_score[in_domain])  # fmt: skip
            entry["unknown_images"] = int((in_domain & ~known).sum())
        out[run.domains[int(number)]] = entry
    return out


def running_accuracy(correct: np.ndarray, window: int, points: int = 400) -> list[list[float]]:
    """[[samples seen, accuracy % over the last `window` samples], ...] along a stream."""
    window = max(1, min(window, len(correct)))
    sums = np.concatenate([[0], np.cumsum(correct, dtype=np.int64)])
    ends = np.unique(np.linspace(window, len(correct), num=min(points, len(correct)), dtype=int))
    return [[int(e), float(100.0 * (sums[e] - sums[e - window]) / window)] for e in ends]


def long_stream_metrics(run: Run) -> dict[str, Any]:
    """Collapse figures of a multi-pass stream: accuracy per pass and per tenth, running."""
    correct = run.correct()
    tenths = np.array_split(correct, 10)
    passes = np.array_split(correct, run.stream.passes)
    window = len(passes[0])  # one whole pass: every corruption weighs the same at every point
    return {
        "first_tenth": percent(tenths[0]),
        "last_tenth": percent(tenths[-1]),
        "pass_accuracy": [percent(p) for p in passes],
        "window": window,
        "running": running_accuracy(correct, window),
    }


def scenario_summary(runs: Iterable[Run], baselines: dict[int, Run] | None = None) -> dict[str, Any]:  # fmt: skip
    """Merge the runs of one (policy, scenario) into its figures; `baselines` maps a
    stream's `id` to the baseline policy's run of it (for `domain_metrics`)."""
    runs = list(runs)
    domains: dict[str, dict[str, Any]] = {}
    for run in runs:
        domains.update(domain_metrics(run, (baselines or {}).get(id(run.stream))))
    corrupted = [v["accuracy"] for k, v in domains.items() if k != CLEAN]
    summary: dict[str, Any] = {
        "domains": domains,
        "mean_corrupted": float(np.mean(corrupted)) if corrupted else None,
        "clean": domains[CLEAN]["accuracy"] if CLEAN in domains else None,
        "images": int(sum(len(r.stream) for r in runs)),
        "requests": int(sum(r.stream.num_requests for r in runs)),
        "resets": int(sum(r.outcome.resets for r in runs)),
        "seconds": float(sum(r.outcome.seconds for r in runs)),
    }
    aurocs = [v["auroc"] for k, v in domains.items() if "auroc" in v and k != CLEAN]
    if aurocs:
        summary["mean_auroc"] = float(np.mean(aurocs))
        summary["clean_auroc"] = domains.get(CLEAN, {}).get("auroc")
    if any(r.stream.passes > 1 for r in runs):
        summary["long"] = long_stream_metrics(next(r for r in runs if r.stream.passes > 1))
    return summary


def summarize(runs: Iterable[Run], baseline: str = "source", candidate: str | None = None) -> dict[str, dict[str, dict[str, Any]]]:  # fmt: skip
    """results[policy][scenario] for every (policy, scenario) present, in run order. Every
    other policy's domains also get the paired standard error of their gap to `baseline`
    where it replayed the same streams; the `candidate` policy's scenarios get `se_vs`,
    per other policy the standard error of the gap between their headline figures."""
    runs = list(runs)
    baselines = {id(run.stream): run for run in runs if run.policy == baseline}
    grouped: dict[tuple[str, str], list[Run]] = defaultdict(list)
    for run in runs:
        grouped[(run.policy, run.scenario)].append(run)
    results: dict[str, dict[str, dict[str, Any]]] = {}
    for (policy, scenario), group in grouped.items():
        paired = baselines if policy != baseline else None
        results.setdefault(policy, {})[scenario] = scenario_summary(group, paired)
    for scenario, figures in results.get(candidate or "", {}).items():
        mine = grouped[(candidate, scenario)]  # type: ignore[index]
        figures["se_vs"] = {
            policy: mean_gap_error(
                mine, {id(run.stream): run for run in grouped[(policy, scenario)]}
            )  # fmt: skip
            for policy in results
            if policy != candidate and (policy, scenario) in grouped
        }
    return results
