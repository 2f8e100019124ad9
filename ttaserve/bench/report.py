"""Writes the accuracy benchmark's results: markdown tables, JSON and a running-accuracy plot."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from ttaserve.bench.summary import CLEAN

MARKDOWN_FILE = "accuracy.md"
JSON_FILE = "accuracy.json"
PLOT_FILE = "running_accuracy.png"


def _fmt(value: float | None, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.{digits}f}"


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def main_table(results: dict[str, dict[str, Any]], scenarios: list[str]) -> str:
    """policy x scenario: mean top-1 accuracy over corruptions, plus clean (iid)."""
    clean_from = next((s for s in ["iid", *scenarios] if any(r.get(s, {}).get("clean") is not None for r in results.values())), None)  # fmt: skip
    header = ["policy", *scenarios] + ([f"clean ({clean_from})"] if clean_from else [])
    rows = []
    for policy, by_scenario in results.items():
        row = [policy] + [_fmt(by_scenario.get(s, {}).get("mean_corrupted")) for s in scenarios]
        if clean_from:
            row.append(_fmt(by_scenario.get(clean_from, {}).get("clean")))
        rows.append(row)
    return table(header, rows)


def detail_table(results: dict[str, dict[str, Any]], scenario: str, key: str = "accuracy") -> str:
    """policy x domain for one scenario (`key`: accuracy or auroc)."""
    domains: list[str] = []
    for by_scenario in results.values():
        for name in by_scenario.get(scenario, {}).get("domains", {}):
            if name not in domains:
                domains.append(name)
    domains.sort(key=lambda d: d != CLEAN)  # clean first, then the run order
    digits = 3 if key == "auroc" else 1
    mean_key = "mean_auroc" if key == "auroc" else "mean_corrupted"
    rows = []
    for policy, by_scenario in results.items():
        figures = by_scenario.get(scenario)
        if figures is None:
            continue
        cells = [_fmt(figures["domains"].get(d, {}).get(key), digits) for d in domains]
        rows.append([policy, *cells, _fmt(figures.get(mean_key), digits)])
    return table(["policy", *domains, "mean (corrupted)"], rows)


def timing_table(results: dict[str, dict[str, Any]], scenarios: list[str]) -> str:
    """policy x scenario: wall seconds of the replay (ms per image in brackets)."""
    rows = []
    for policy, by_scenario in results.items():
        cells = []
        for s in scenarios:
            f = by_scenario.get(s)
            cells.append("–" if f is None else f"{f['seconds']:.0f} s ({1000 * f['seconds'] / max(1, f['images']):.1f} ms/img)")  # fmt: skip
        total = sum(f["seconds"] for f in by_scenario.values())
        rows.append([policy, *cells, f"{total:.0f} s"])
    return table(["policy", *scenarios, "total"], rows)


TARGETS_LEGEND = (
    "`± SE`: the standard error of a gap (to `source`, or between two policies' means over "
    "corruptions), paired over the same images; a gap within about two of them of its "
    "threshold stands on too few images to call."
)


def targets_table(targets: dict[str, dict[str, dict[str, Any]]]) -> str:
    rows = [
        [scenario, name, "yes" if check["met"] else "**no**", check["detail"]]
        for scenario, checks in targets.items()
        for name, check in checks.items()
    ]
    return table(["scenario", "target", "met", "detail"], rows)


def long_stream_table(results: dict[str, dict[str, Any]]) -> str:
    rows = []
    passes = 0
    for policy, by_scenario in results.items():
        long = by_scenario.get("continual_long", {}).get("long")
        if long:
            passes = max(passes, len(long["pass_accuracy"]))
            rows.append([policy, _fmt(long["first_tenth"]), _fmt(long["last_tenth"]), *map(_fmt, long["pass_accuracy"]), str(by_scenario["continual_long"]["resets"])])  # fmt: skip
    header = ["policy", "first tenth", "last tenth", *[f"pass {i + 1}" for i in range(passes)], "resets"]  # fmt: skip
    return table(header, rows)


def markdown_report(report: dict[str, Any], plot_written: bool) -> str:
    """The whole markdown report."""
    cfg, results = report["config"], report["results"]
    scenarios = cfg["scenarios"]
    parts = [
        "# ttaserve accuracy benchmark",
        "",
        f"Model `{report['model']['name']}` ({report['model']['directory']}), data `{cfg['data']}`, "
        f"severity {cfg['severity']}, {cfg['images_per_corruption']} images per corruption "
        f"({cfg['per_class']} per class), {len(cfg['corruptions'])} corruptions, seed {cfg['seed']}; "
        f"{report['elapsed_seconds']:.0f} s in all. Top-1 accuracy in %; open-set accuracy is over "
        "known-class images only.",
        "",
        "## Mean accuracy over corruptions",
        "",
        main_table(results, scenarios),
    ]
    if "open_set" in scenarios:
        parts += ["", "## Open-set AUROC (unknown: corrupted digits)", "", detail_table(results, "open_set", "auroc")]  # fmt: skip
    if report["targets"]:
        parts += ["", "## Targets of `default`", "", TARGETS_LEGEND, "", targets_table(report["targets"])]  # fmt: skip
    parts += ["", "## Time per (policy, scenario)", "", timing_table(results, scenarios)]
    parts += ["", "## Accuracy per corruption"]
    for scenario in scenarios:
        parts += ["", f"### {scenario}", "", detail_table(results, scenario)]
    if "continual_long" in scenarios:
        parts += ["", "## Long continual stream (collapse test)", "", long_stream_table(results)]
    if plot_written:
        parts += ["", f"![running accuracy]({PLOT_FILE})"]
    else:
        parts += ["", "(No running-accuracy plot: `continual_long` was not run.)"]
    return "\n".join(parts) + "\n"


def plot_running_accuracy(results: dict[str, dict[str, Any]], path: Path, title: str) -> bool:
    """Running accuracy along `continual_long` per policy; False if no policy ran it."""
    curves = {p: r["continual_long"]["long"] for p, r in results.items() if "long" in r.get("continual_long", {})}  # fmt: skip
    if not curves:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(11, 4.8))
    colors = [*plt.get_cmap("tab10").colors, *plt.get_cmap("tab20").colors[1::2]]
    for i, (policy, long) in enumerate(curves.items()):
        xs, ys = zip(*long["running"], strict=True)
        style = "-" if i < len(colors) else "--"
        ax.plot(xs, ys, style, color=colors[i % len(colors)], label=policy, linewidth=1.3)
    some = next(iter(curves.values()))
    length = some["running"][-1][0]
    for k in range(1, len(some["pass_accuracy"])):
        ax.axvline(length * k / len(some["pass_accuracy"]), color="grey", linewidth=0.5, linestyle=":")  # fmt: skip
    ax.set_xlim(0, length)
    ax.set_xlabel("images seen (dotted: end of each pass over all corruptions)")
    ax.set_ylabel(f"accuracy over the last pass,\n{some['window']} images (%)")
    ax.set_ylim(0, 100)
    ax.set_title(title)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def write_report(report: dict[str, Any], out_dir: Path) -> dict[str, Path]:
    """Write markdown, JSON and (when there is a long stream) the PNG; return their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"markdown": out_dir / MARKDOWN_FILE, "json": out_dir / JSON_FILE}
    title = f"{report['model']['name']}: running accuracy on continual_long (severity {report['config']['severity']})"  # fmt: skip
    if plot_running_accuracy(report["results"], out_dir / PLOT_FILE, title):
        paths["plot"] = out_dir / PLOT_FILE
    paths["markdown"].write_text(markdown_report(report, "plot" in paths))
    paths["json"].write_text(json.dumps(json_ready(report), indent=1, allow_nan=False) + "\n")
    return paths


def json_ready(value: Any) -> Any:
    """`value` with NaN/inf as null, paths as strings and arrays as lists."""
    if isinstance(value, dict):
        return {str(k): json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    if hasattr(value, "tolist"):
        return json_ready(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value
