"""Does the label shift adapter beat the training-free correction? A check on test data.

`python -m ttaserve.label_adapter_check --model models/cifar10-resnet20` streams the
clean CIFAR-10 test set under long-tailed (IR 10, 100), Dirichlet and uniform label
distributions through the frozen model and prints top-1 accuracy of the source model,
the training-free correction (logits + log pi_hat - log pi_s) and the adapter side by
side, for three estimates pi_hat: Saerens EM on each batch of 64, EM on the whole
stream, and the server's online estimate (`LabelShiftCorrection`, i.e.
`PriorCorrection`: a per-stream EMA plus MAP-EM per request, in requests of 64), all on
temperature-scaled posteriors. Clean data uses the source BN statistics; `--corruptions`
adds corrupted copies of a 2000-image subset (severity 5, the benchmark's functions)
with the BN statistics of 500-image i.i.d. chunks (BN-adapt).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from ttaserve.adapters.label_shift_adapter import (
    LabelShiftAdapter,
    LabelShiftCorrection,
    label_shift_correction,
)
from ttaserve.adapters.moments import Segments
from ttaserve.adapters.policy import BatchView, Observation, SourceModel
from ttaserve.adapters.stream_norm import NormContext, StreamNorm, active_context
from ttaserve.bench.corruptions import cached_corrupt_images
from ttaserve.bench.scenarios import longtail_counts
from ttaserve.datasets import LabelledImages, default_cifar10_dir, load_npz, stratified_subset
from ttaserve.label_adapter_training import SourceLogits, estimate_prior, source_logits
from ttaserve.server.decoding import images_to_tensor
from ttaserve.server.model_package import LoadedModel, load_package

BATCH = 64
ESTIMATES = ("batch", "stream", "online")
Scenario = Callable[[torch.Tensor, np.random.Generator], np.ndarray]


def longtail_stream(labels: torch.Tensor, imbalance_ratio: float, rng: np.random.Generator) -> np.ndarray:  # fmt: skip
    """Shuffled long-tailed subset (the benchmark's profile), classes in a random order."""
    k = int(labels.max()) + 1
    by_class = [rng.permutation(np.flatnonzero(labels.numpy() == c)) for c in range(k)]
    counts = longtail_counts(min(len(v) for v in by_class), k, imbalance_ratio)
    classes = rng.permutation(k)
    return rng.permutation(np.concatenate([by_class[c][:n] for c, n in zip(classes, counts, strict=True)]))  # fmt: skip


def dirichlet_stream(labels: torch.Tensor, alpha: float, rng: np.random.Generator, size: int = 2000) -> np.ndarray:  # fmt: skip
    """`size` samples (without replacement where possible) under pi ~ Dir(alpha)."""
    k = int(labels.max()) + 1
    counts = rng.multinomial(size, rng.dirichlet(np.full(k, alpha)))
    by_class = [rng.permutation(np.flatnonzero(labels.numpy() == c)) for c in range(k)]
    picked = [rng.choice(by_class[c], n, replace=n > len(by_class[c])) for c, n in enumerate(counts)]  # fmt: skip
    return rng.permutation(np.concatenate(picked))


def scenarios() -> dict[str, Scenario]:
    return {
        "uniform": lambda y, rng: rng.permutation(len(y))[:2000],
        "longtail_ir10": lambda y, rng: longtail_stream(y, 10.0, rng),
        "longtail_ir100": lambda y, rng: longtail_stream(y, 100.0, rng),
        "dirichlet_1.0": lambda y, rng: dirichlet_stream(y, 1.0, rng),
        "dirichlet_0.1": lambda y, rng: dirichlet_stream(y, 0.1, rng),
    }


def batch_priors(logits: torch.Tensor, source: SourceModel, size: int) -> torch.Tensor:
    """Per-sample EM estimates over consecutive batches of `size`."""
    chunks = logits.split(size)
    return torch.cat([estimate_prior(z, source.temperature, source.prior, 100).expand(len(z), -1) for z in chunks])  # fmt: skip


def online_corrections(logits: torch.Tensor, source: SourceModel, adapter: LabelShiftAdapter) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """(training-free, adapter) logits of the server's output piece, request by request."""
    piece = LabelShiftCorrection()
    with_adapter = replace(source, label_adapter=adapter)
    state = piece.init_state(source)
    free, adapted = [], []
    for z in logits.split(BATCH):
        stacked = {k: v.unsqueeze(0) for k, v in state.items()}
        segments = Segments.from_sizes([len(z)])
        free.append(piece.correct(BatchView(z, None, stacked, segments, source), z))
        adapted.append(piece.correct(BatchView(z, None, stacked, segments, with_adapter), z))
        none = torch.zeros(len(z), dtype=torch.bool)
        state = piece.update(state, Observation([], z.softmax(1), z, ~none, none), source)
    return torch.cat(free), torch.cat(adapted)


@torch.no_grad()
def stream_accuracies(data: SourceLogits, order: np.ndarray, source: SourceModel, adapter: LabelShiftAdapter) -> dict[str, float]:  # fmt: skip
    """Accuracy of source, training-free and adapter under each estimate, on one stream."""
    picked = data.subset(torch.as_tensor(order))
    logits, labels = picked.logits, picked.labels

    def accuracy(z: torch.Tensor) -> float:
        return float((z.argmax(1) == labels).float().mean())

    out = {"source": accuracy(logits)}
    for estimate, size in (("batch", BATCH), ("stream", len(logits))):
        prior = batch_priors(logits, source, size)
        out[f"{estimate}/training_free"] = accuracy(label_shift_correction(None, logits, prior, source.prior))  # fmt: skip
        out[f"{estimate}/adapter"] = accuracy(adapter(logits, prior, source.prior))
    free, adapted = online_corrections(logits, source, adapter)
    out["online/training_free"], out["online/adapter"] = accuracy(free), accuracy(adapted)
    return out


def compare(data: SourceLogits, source: SourceModel, adapter: LabelShiftAdapter, seeds: int = 5) -> dict[str, dict[str, float]]:  # fmt: skip
    """Mean accuracies per scenario over `seeds` streams each."""
    table: dict[str, dict[str, float]] = {}
    for name, make in scenarios().items():
        runs = [stream_accuracies(data, make(data.labels, np.random.default_rng(seed)), source, adapter) for seed in range(seeds)]  # fmt: skip
        table[name] = {key: float(np.mean([r[key] for r in runs])) for key in runs[0]}
    return table


def format_table(table: dict[str, dict[str, float]]) -> str:
    """Markdown: one row per scenario, source then (training-free | adapter) per estimate."""
    header = "| scenario | source | " + " | ".join(f"{e} EM: free | {e} EM: adapter" for e in ESTIMATES) + " |"  # fmt: skip
    lines = [header, "|---" * (2 + 2 * len(ESTIMATES)) + "|"]
    for name, row in table.items():
        cells = [f"{100 * row['source']:.2f}"] + [f"{100 * row[f'{e}/{m}']:.2f}" for e in ESTIMATES for m in ("training_free", "adapter")]  # fmt: skip
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _adapted_statistics(_layer: int, mean: torch.Tensor, var: torch.Tensor, _norm: StreamNorm) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """BN-adapt: the statistics of the whole forward batch."""
    pooled = mean.mean(0, keepdim=True)
    return pooled, (var + mean.square()).mean(0, keepdim=True) - pooled.square()


@torch.inference_mode()
def corrupted_logits(model: LoadedModel, test: LabelledImages, corruption: str, per_class: int = 200) -> SourceLogits:  # fmt: skip
    """Logits of a corrupted class-stratified subset, BN-adapt in i.i.d. chunks of 500."""
    subset = test.subset(stratified_subset(test.y, per_class, 0))
    images = cached_corrupt_images(subset.x.numpy(), corruption, 5)
    spec = model.card.input
    logits = []
    for start in range(0, len(images), 500):
        x = images_to_tensor(images[start : start + 500], tuple(spec.mean), tuple(spec.std))
        with active_context(NormContext(statistics=_adapted_statistics)):
            logits.append(model.module(x))
    return SourceLogits(torch.cat(logits), subset.y)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="models/cifar10-resnet20", help="package with a label_adapter.safetensors")  # fmt: skip
    parser.add_argument("--data", default=None, help="folder with test.npz (default: shared CIFAR-10)")  # fmt: skip
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--corruptions", default="", help="comma list, e.g. snow,contrast")
    args = parser.parse_args(argv)
    model = load_package(Path(args.model))
    if model.label_adapter is None:
        raise SystemExit(f"{args.model} has no label adapter: run `ttaserve train-label-adapter` first")  # fmt: skip
    calibration = model.card.calibration
    source = SourceModel([], torch.tensor(model.card.source_prior), model.num_classes, temperature=calibration.temperature if calibration else 1.0)  # fmt: skip
    test = load_npz(Path(args.data or default_cifar10_dir()) / "test.npz")
    domains: dict[str, Callable[[], SourceLogits]] = {"clean": lambda: source_logits(model, test)}
    domains |= {c: (lambda c=c: corrupted_logits(model, test, c)) for c in args.corruptions.split(",") if c}  # fmt: skip
    for name, logits in domains.items():
        print(f"\n{name}\n" + format_table(compare(logits(), source, model.label_adapter, args.seeds)))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
