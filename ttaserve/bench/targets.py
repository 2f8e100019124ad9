"""The acceptance targets of the `default` policy, checked scenario by scenario.

1. `>= source on every corruption` (every scenario, per corruption);
2. `clean within 0.5 of source` (scenarios with a clean stream: not lower by more);
3. `>= best other row on average` (mean over corruptions, against every other policy);
4. `single keeps >= 90% of the iid gain` over source (scenario `single`);
5. `no collapse`: last tenth of `continual_long` >= first tenth - 2 points.

Where the results carry it, a gap is followed by `± SE`, the paired standard error of
that gap on its images (`summary.paired_standard_error`; for the mean over corruptions,
`summary.mean_gap_error`): it says whether a miss stands on enough images to be real. It
never changes whether a target is met.
"""

from __future__ import annotations

import math
from typing import Any

from ttaserve.bench.summary import CLEAN, se_key

CANDIDATE = "default"
BASELINE = "source"
CLEAN_TOLERANCE = 0.5
SINGLE_GAIN_KEPT = 0.9
COLLAPSE_TOLERANCE = 2.0

Check = dict[str, Any]  # {"met": bool, "detail": str}


def _check(met: bool, detail: str) -> Check:
    return {"met": bool(met), "detail": detail}


def every_corruption(mine: dict[str, Any], source: dict[str, Any], baseline: str = BASELINE) -> Check:  # fmt: skip
    gaps = {
        name: v["accuracy"] - source["domains"][name]["accuracy"]
        for name, v in mine["domains"].items()
        if name != CLEAN and name in source["domains"]
    }
    if not gaps:
        return _check(True, "no corruption")
    worst = min(gaps, key=gaps.__getitem__)
    below = sorted(k for k, g in gaps.items() if g < 0)
    domain = mine["domains"][worst]
    detail = f"worst {worst} {gaps[worst]:+.1f}{_error(domain, baseline)}{_images(domain)}"
    return _check(not below, detail + (f"; below on {', '.join(below)}" if below else ""))


def _images(domain: dict[str, Any]) -> str:
    """' (n images)': how many images a percentage stands on (one image of 72 is 1.4 points)."""
    return f" ({domain['images']} images)" if "images" in domain else ""


def _error(domain: dict[str, Any], baseline: str) -> str:
    """' ± SE' of the domain's gap to `baseline`, where known."""
    return _plus_minus(domain.get(se_key(baseline)))


def _plus_minus(se: float | None) -> str:
    """' ± SE' for a known, finite standard error; '' otherwise (none, or NaN)."""
    return f" ± {se:.1f}" if se is not None and math.isfinite(se) else ""


def clean_within(mine: dict[str, Any], source: dict[str, Any], baseline: str = BASELINE) -> Check:  # fmt: skip
    gap = mine["clean"] - source["clean"]
    domain = mine["domains"].get(CLEAN, {})
    return _check(gap >= -CLEAN_TOLERANCE, f"clean {gap:+.1f}{_error(domain, baseline)} vs {baseline}{_images(domain)}")  # fmt: skip


def best_on_average(policy: str, results: dict[str, dict[str, Any]], scenario: str) -> Check:
    mine = results[policy][scenario]["mean_corrupted"]
    others = {p: r[scenario]["mean_corrupted"] for p, r in results.items() if p != policy and scenario in r}  # fmt: skip
    if not others:
        return _check(True, "no other policy")
    best = max(others, key=others.__getitem__)
    error = _plus_minus(results[policy][scenario].get("se_vs", {}).get(best))
    return _check(mine >= others[best], f"{mine - others[best]:+.1f}{error} vs best other ({best})")  # fmt: skip


def single_keeps_gain(mine: dict[str, Any], source: dict[str, Any]) -> Check:
    iid_gain = mine["iid"]["mean_corrupted"] - source["iid"]["mean_corrupted"]
    single_gain = mine["single"]["mean_corrupted"] - source["single"]["mean_corrupted"]
    needed = SINGLE_GAIN_KEPT * iid_gain if iid_gain > 0 else iid_gain
    return _check(single_gain >= needed, f"single gain {single_gain:+.1f} vs iid gain {iid_gain:+.1f}")  # fmt: skip


def no_collapse(mine: dict[str, Any]) -> Check:
    first, last = mine["long"]["first_tenth"], mine["long"]["last_tenth"]
    return _check(last >= first - COLLAPSE_TOLERANCE, f"first tenth {first:.1f}, last tenth {last:.1f}")  # fmt: skip


def check_targets(
    results: dict[str, dict[str, Any]], policy: str = CANDIDATE, baseline: str = BASELINE
) -> dict[str, dict[str, Check]]:
    """targets[scenario][target] for `policy` against `baseline`; empty if either is absent."""
    if policy not in results or baseline not in results:
        return {}
    mine, source = results[policy], results[baseline]
    out: dict[str, dict[str, Check]] = {}
    for scenario, figures in mine.items():
        if scenario not in source:
            continue
        checks = {">= source on every corruption": every_corruption(figures, source[scenario], baseline)}  # fmt: skip
        if figures["clean"] is not None and source[scenario]["clean"] is not None:
            checks["clean within 0.5 of source"] = clean_within(figures, source[scenario], baseline)  # fmt: skip
        checks[">= best other row on average"] = best_on_average(policy, results, scenario)
        if scenario == "single" and "iid" in mine and "iid" in source:
            checks["single keeps >= 90% of iid gain"] = single_keeps_gain(mine, source)
        if "long" in figures:
            checks["no collapse (last tenth >= first - 2)"] = no_collapse(figures)
        out[scenario] = checks
    return out
