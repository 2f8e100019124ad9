"""`ttaserve bench accuracy`: replay labelled, corrupted streams through the dataplane.

Builds the model once (`ModelRunner(load_package(...))`), then for every policy, scenario
and corruption replays a fresh stream request by request through `DataPlane.process_batch`
(the server's own code path, in process) and scores the answers. Writes a markdown report,
a JSON file with every number and a plot of running accuracy along the long continual
stream under --out. See `scenarios.py` for the streams and `corruptions.py` for which
corruptions are used at 32x32 and how.

Default size: 200 images per class (2,000 per corruption), all scenarios, 10 of the 15
corruptions plus clean, with 20 per class for `single` and for the 10-pass
`continual_long`: ~170k images per policy, about 8 minutes for a forward-only policy and
15 for a gradient one on 2 busy CPU cores; `--jobs N` replays N policies at a time in
worker processes (the same numbers, N times faster on N free cores). `--quick`: 3 corruptions, 50 per class,
iid/correlated/single. `--full`: all 10,000 images and all 15 corruptions everywhere.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from ttaserve.adapters.registry import POLICIES, parse_variant, register_variant
from ttaserve.bench.corruptions import DEFAULT_CACHE_DIR, KEPT_CORRUPTIONS, cached_corrupt_images
from ttaserve.bench.open_set import digits_images
from ttaserve.bench.parallel import replay_in_workers
from ttaserve.bench.replay import StreamImages, replay_stream
from ttaserve.bench.report import main_table, targets_table, write_report
from ttaserve.bench.scenarios import (
    ACROSS_CORRUPTION_SCENARIOS,
    BATCH_SIZE,
    OPEN_SET_FRACTION,
    PER_CORRUPTION_SCENARIOS,
    SCENARIOS,
    Stream,
    across_corruption_stream,
    per_corruption_stream,
)
from ttaserve.bench.summary import CLEAN, Run, summarize
from ttaserve.bench.targets import BASELINE, CANDIDATE, check_targets
from ttaserve.datasets import default_cifar10_dir, load_npz, stratified_subset
from ttaserve.server.allocator import tune_glibc_malloc
from ttaserve.server.model_package import load_package
from ttaserve.server.model_runner import ModelRunner
from ttaserve.server.settings import bundled_model_path

# Default: 10 of the 15 (each family, dropping near-duplicates and the mildest) to fit in
# about an hour with ~6 policies on 2 CPU cores; --full runs all kept corruptions.
DEFAULT_CORRUPTIONS = (
    "gaussian_noise", "impulse_noise", "defocus_blur", "glass_blur", "motion_blur",
    "snow", "frost", "fog", "contrast", "jpeg_compression",
)  # fmt: skip
QUICK_CORRUPTIONS = ("gaussian_noise", "defocus_blur", "snow")
QUICK_SCENARIOS = ("iid", "correlated", "single")
SIZES = {  # per_class, single_per_class, long_per_class
    "default": (200, 20, 20),
    "quick": (50, 10, 20),
    "full": (1_000_000, 1_000_000, 1_000_000),  # all there is
}


@dataclass(frozen=True)
class Plan:
    """One stream to replay for every policy."""

    scenario: str
    domains: tuple[str, ...]
    labels: np.ndarray
    stream: Stream
    images: StreamImages


def _positive(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {number}")
    return number


def _names(value: str, known: tuple[str, ...] | list[str], what: str) -> list[str]:
    names = [v.strip() for v in value.split(",") if v.strip()]
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown {what} {', '.join(unknown) or '(none given)'}; known: {', '.join(known)}")  # fmt: skip
    return list(dict.fromkeys(names))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ttaserve bench accuracy", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--data", type=Path, help="labelled npz (x uint8 NHWC, y) or a folder with test.npz (default: the CIFAR-10 test set)")  # fmt: skip
    parser.add_argument("--model", type=Path, help="model package folder (default: the bundled demo model)")  # fmt: skip
    parser.add_argument("--policies", help=f"comma list (default: all registered: {', '.join(POLICIES)})")  # fmt: skip
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=BASE:FIELD=VALUE;...", help="add policy NAME: policy BASE with fields of its statistics piece replaced, e.g. 'a25=default:class_specific_alpha=0.25' (repeatable; name it in --policies)")  # fmt: skip
    parser.add_argument("--scenarios", help=f"comma list (default: all: {', '.join(SCENARIOS)})")
    parser.add_argument("--corruptions", help=f"comma list of {', '.join(KEPT_CORRUPTIONS)} (default: {', '.join(DEFAULT_CORRUPTIONS)}; --full: all)")  # fmt: skip
    parser.add_argument("--severity", type=int, default=5, choices=range(1, 6), help="corruption severity (default 5)")  # fmt: skip
    parser.add_argument("--per-class", type=_positive, help="images per class and corruption (default 200)")  # fmt: skip
    parser.add_argument("--single-per-class", type=_positive, help="per class for the batch-1 scenario (default 20)")  # fmt: skip
    parser.add_argument("--long-per-class", type=_positive, help="per class and corruption for continual_long (default 20)")  # fmt: skip
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--full", action="store_true", help="all images, all kept corruptions (for GPU machines)")  # fmt: skip
    size.add_argument("--quick", action="store_true", help=f"a few minutes on 2 cores: {', '.join(QUICK_CORRUPTIONS)}, 50 per class, {', '.join(QUICK_SCENARIOS)}")  # fmt: skip
    parser.add_argument("--out", type=Path, default=Path("bench-results/accuracy"), help="output folder")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--jobs", type=_positive, default=1, help="worker processes replaying policies side by side (each with threads/jobs torch threads); registered and --variant policies only")  # fmt: skip
    parser.add_argument("--threads", type=int, default=0, help="torch threads and corruption processes (default: all cores; use 1 while other work keeps the cores busy)")  # fmt: skip
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE_DIR, help="corrupted-image cache folder")  # fmt: skip
    parser.add_argument("--no-cache", action="store_true", help="recompute corruptions, write no cache")  # fmt: skip
    return parser


def resolve_config(args: argparse.Namespace, parser: argparse.ArgumentParser) -> dict[str, Any]:
    """Turn options (and --quick/--full) into one explicit configuration."""
    mode = "full" if args.full else "quick" if args.quick else "default"
    per_class, single, long = SIZES[mode]
    try:
        register_variants(args.variant)
    except ValueError as exc:
        parser.error(str(exc))
    try:
        policies = _names(args.policies, list(POLICIES), "policy") if args.policies else list(POLICIES)  # fmt: skip
        default_scenarios = QUICK_SCENARIOS if args.quick else SCENARIOS
        scenarios = _names(args.scenarios, SCENARIOS, "scenario") if args.scenarios else list(default_scenarios)  # fmt: skip
        default_corruptions = {"quick": QUICK_CORRUPTIONS, "full": KEPT_CORRUPTIONS}.get(mode, DEFAULT_CORRUPTIONS)  # fmt: skip
        corruptions = _names(args.corruptions, KEPT_CORRUPTIONS, "corruption") if args.corruptions else list(default_corruptions)  # fmt: skip
    except argparse.ArgumentTypeError as exc:
        parser.error(str(exc))
    data = args.data or default_cifar10_dir() / "test.npz"
    if data.is_dir():
        data = data / "test.npz"
    return {
        "mode": mode,
        "data": str(data),
        "model": str(args.model or bundled_model_path()),
        "policies": policies,
        "variants": list(args.variant),
        "scenarios": [s for s in SCENARIOS if s in scenarios],
        "corruptions": corruptions,
        "severity": args.severity,
        "per_class": args.per_class or per_class,
        "single_per_class": args.single_per_class or single,
        "long_per_class": args.long_per_class or long,
        "seed": args.seed,
        "threads": args.threads or os.cpu_count() or 1,
        "jobs": args.jobs,
        "cache": None if args.no_cache else str(args.cache),
        "out": str(args.out),
        "batch_size": BATCH_SIZE,
    }


def register_variants(specs: list[str]) -> None:
    """Register the `--variant` policies (in the parent and in every worker process)."""
    for spec in specs:
        register_variant(*parse_variant(spec))


def _positions(labels: np.ndarray, per_class: int, seed: int) -> np.ndarray:
    """A class-stratified subset of positions into `labels`, in a seeded order."""
    return stratified_subset(torch.as_tensor(labels), per_class, seed).numpy()


def corrupt_domains(clean: np.ndarray, cfg: dict[str, Any], what: str) -> dict[str, np.ndarray]:
    """{corruption: corrupted images} for every configured corruption (cached)."""
    cache = Path(cfg["cache"]) if cfg["cache"] else None
    out = {}
    with tqdm(total=len(clean) * len(cfg["corruptions"]), desc=f"corrupting {what}", unit="img") as bar:  # fmt: skip
        for name in cfg["corruptions"]:
            bar.set_postfix_str(name)
            out[name] = cached_corrupt_images(clean, name, cfg["severity"], cache, cfg["threads"], bar.update)  # fmt: skip
    return out


def open_set_pool(images: np.ndarray, cfg: dict[str, Any], known_per_stream: int) -> dict[str, np.ndarray]:  # fmt: skip
    """{domain: unknown images} with enough digits for one open-set stream."""
    n_unknown = round(BATCH_SIZE * OPEN_SET_FRACTION)
    needed = math.ceil(known_per_stream / (BATCH_SIZE - n_unknown)) * n_unknown
    digits = digits_images(images.shape[1:3], limit=needed, seed=cfg["seed"])
    return {CLEAN: digits, **corrupt_domains(digits, cfg, "open-set images")}


def plan_streams(x: np.ndarray, y: np.ndarray, cfg: dict[str, Any]) -> list[Plan]:
    """Every stream of the configured scenarios (the same for every policy)."""
    seed = cfg["seed"]
    main = _positions(y, cfg["per_class"], seed)
    clean, labels = x[main], y[main]
    cfg["images_per_corruption"] = len(main)
    cfg["per_class"] = int(np.bincount(labels).max())  # what the data had (--full: all)
    domains = {CLEAN: clean, **corrupt_domains(clean, cfg, "images")}
    per_corruption = [s for s in cfg["scenarios"] if s in PER_CORRUPTION_SCENARIOS]
    pool = open_set_pool(clean, cfg, len(clean)) if "open_set" in per_corruption else {}
    single = _positions(labels, cfg["single_per_class"], seed + 1)
    plans = []
    for scenario in per_corruption:
        part = single if scenario == "single" else np.arange(len(labels))
        for number, (name, images) in enumerate(domains.items()):
            stream = per_corruption_stream(scenario, labels[part], seed, number, len(pool.get(name, ())))  # fmt: skip
            unknown = pool[name][None] if scenario == "open_set" else None
            plans.append(Plan(scenario, (name,), labels[part], stream, StreamImages(images[part][None], unknown)))  # fmt: skip
    across = [s for s in cfg["scenarios"] if s in ACROSS_CORRUPTION_SCENARIOS]
    names = tuple(cfg["corruptions"])
    if across:
        stacked = np.stack([domains[n] for n in names])
        long = _positions(labels, cfg["long_per_class"], seed + 2)
    for scenario in across:
        part = long if scenario == "continual_long" else np.arange(len(labels))
        stream = across_corruption_stream(scenario, labels[part], len(names), seed)
        images = stacked[:, part] if scenario == "continual_long" else stacked
        plans.append(Plan(scenario, names, labels[part], stream, StreamImages(images)))
    return plans


async def replay_all(runner: ModelRunner, plans: list[Plan], policies: list[str]) -> list[Run]:
    """Replay every plan for every policy, with a progress bar."""
    runs = []
    total = len(policies) * sum(len(p.stream) for p in plans)
    with tqdm(total=total, desc="replaying", unit="img", smoothing=0.05, mininterval=1.0) as bar:
        for policy in policies:
            for plan in plans:
                bar.set_postfix_str(f"{policy} {plan.scenario} {plan.domains[0] if len(plan.domains) == 1 else 'all'}")  # fmt: skip
                outcome = await replay_stream(runner, policy, plan.stream, plan.images, bar.update)
                runs.append(Run(policy, plan.scenario, plan.domains, plan.labels, plan.stream, outcome))  # fmt: skip
    return runs


def load_inputs(cfg: dict[str, Any]) -> tuple[ModelRunner, np.ndarray, np.ndarray]:
    """The model runner and the labelled images, checked against each other."""
    data, model_dir = Path(cfg["data"]), Path(cfg["model"])
    if not data.is_file():
        raise SystemExit(f"no labelled data at {data}: pass --data or set TTASERVE_CIFAR10_DIR")
    if not (model_dir / "model.json").is_file():
        raise SystemExit(f"no model package at {model_dir}: pass --model or run `ttaserve train-demo`")  # fmt: skip
    runner = ModelRunner(load_package(model_dir))
    labelled = load_npz(data)
    x, y = labelled.x.numpy(), labelled.y.numpy()
    spec = runner.model.card.input
    if x.shape[1:] != (spec.height, spec.width, spec.channels):
        raise SystemExit(f"{data}: images are {x.shape[1:]}, the model takes {(spec.height, spec.width, spec.channels)}")  # fmt: skip
    if spec.channels != 3:
        raise SystemExit(
            f"the corruptions need RGB images; the model takes {spec.channels} channels"
        )
    if y.min() < 0 or y.max() >= runner.model.num_classes:
        raise SystemExit(f"{data}: labels must lie in 0..{runner.model.num_classes - 1}")
    return runner, x, y


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; returns the process exit code."""
    parser = build_parser()
    cfg = resolve_config(parser.parse_args(argv), parser)
    started = time.perf_counter()
    tune_glibc_malloc()  # as the server does: activations reuse heap memory
    torch.set_num_threads(cfg["threads"])
    runner, x, y = load_inputs(cfg)
    plans = plan_streams(x, y, cfg)
    if cfg["jobs"] > 1:
        runs = replay_in_workers(cfg, plans, cfg["policies"], cfg["jobs"])
    else:
        runs = asyncio.run(replay_all(runner, plans, cfg["policies"]))
    results = summarize(runs, baseline=BASELINE, candidate=CANDIDATE)  # the pairs the targets read
    card = runner.model.card
    report = {
        "config": cfg,
        "model": {"name": card.name, "directory": cfg["model"], "fingerprint": card.fingerprint},
        "results": results,
        "targets": check_targets(results),
        "elapsed_seconds": time.perf_counter() - started,
    }
    paths = write_report(report, Path(cfg["out"]))
    print(main_table(results, cfg["scenarios"]))
    if report["targets"]:
        print("\n" + targets_table(report["targets"]))
    print("\nwrote " + ", ".join(str(p) for p in paths.values()))
    return 0
