"""`ttaserve train-label-adapter`: train a package's label shift adapter on source data.

The frozen model's logits of the training images (flipped and cropped; the package's
held-out calibration split excluded) are computed once. Each step then samples label
distributions pi (uniform, Dirichlet, long-tailed with a random imbalance ratio and
class order, one dominant class), draws a batch with those class frequencies, estimates
its prior as the server would (Saerens EM on temperature-scaled posteriors, shrunk
towards uniform) and minimizes the loss of the adapted classifier on that batch.

Choices, each measured on the demo model against the training-free correction on test
data (see `ttaserve.label_adapter_check`):
- Loss. The paper's generalized logit-adjusted loss reweights samples drawn under the
  source prior to a target prior, so it needs the true target prior as the adapter's
  input. Here each batch is drawn under the target prior instead, so the adapter sees
  the EM estimate of that very batch, with its errors, as it will at test time. The loss
  is cross-entropy truncated at `loss_clip` nats: plain cross-entropy is dominated by the
  few samples of rare classes whose noisy estimate nearly rules them out, and learns a
  weaker correction that lost 0.5 to 1.8 points under corruptions; truncated, a sample
  the model gets hopelessly wrong cannot pull the correction.
- Temperature. The model is more confident on its own training images (fitted
  temperature 0.58 on the demo model's, 0.80 on held-out ones): the logits are rescaled
  so that the card's temperature calibrates them, as it does unseen images.
- Batch sizes 64 to 4096: the server's estimate of a stream pools many requests; trained
  on small batches only, the adapter learns to distrust rare-class estimates.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch.nn import functional as F  # noqa: N812
from tqdm import tqdm

from ttaserve.adapters.label_shift_adapter import (
    LabelShiftAdapter,
    adapter_to_tensors,
    label_shift_correction,
)
from ttaserve.adapters.prior_correction import em_prior
from ttaserve.datasets import LabelledImages, load_npz, stratified_split
from ttaserve.demo_model import HELD_OUT_PER_CLASS
from ttaserve.server.decoding import images_to_tensor
from ttaserve.server.model_package import LABEL_ADAPTER_FILE, LoadedModel, load_package
from ttaserve.training import augment

log = logging.getLogger(__name__)


@dataclass
class LabelAdapterConfig:
    """Hyper-parameters of `train_label_adapter`."""

    steps: int = 600
    tasks_per_step: int = 16  # label distributions per step, each its own batch
    min_batch: int = 64  # samples behind each EM estimate (log-uniform)
    max_batch: int = 4096
    hidden: int = 64
    lr: float = 3e-3
    weight_decay: float = 1e-4
    loss_clip: float = 2.0  # per-sample cross-entropy cap, nats (0: plain cross-entropy)
    em_steps: int = 20
    smoothing: float = 1e-3  # as PriorCorrection: shrink the estimate towards uniform
    augment: bool = True  # logits of flipped/cropped images
    match_temperature: bool = True
    validation_fraction: float = 0.1
    seed: int = 0


@dataclass(frozen=True)
class SourceLogits:
    """Frozen-model logits of labelled source images."""

    logits: torch.Tensor  # (N, K)
    labels: torch.Tensor  # (N,)

    def subset(self, index: torch.Tensor) -> SourceLogits:
        return SourceLogits(self.logits[index], self.labels[index])


@torch.inference_mode()
def source_logits(model: LoadedModel, images: LabelledImages, gen: torch.Generator | None = None, batch_size: int = 500) -> SourceLogits:  # fmt: skip
    """Logits of the frozen source model (source BN statistics), augmented if `gen`."""
    spec = model.card.input
    logits = []
    for start in tqdm(range(0, len(images), batch_size), desc="source logits", unit="batch"):
        x = images_to_tensor(images.x[start : start + batch_size], tuple(spec.mean), tuple(spec.std))  # fmt: skip
        logits.append(
            model.module(augment(x, gen) if gen is not None else x).float()
        )  # no context: source BN
    return SourceLogits(torch.cat(logits), images.y.clone())


def fitted_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """NLL-optimal softmax temperature of `logits` (grid 0.3 .. 3.0)."""
    grid = torch.linspace(0.3, 3.0, 271)
    nll = torch.stack([F.cross_entropy(logits / t, labels) for t in grid])
    return float(grid[int(nll.argmin())])


def match_temperature(data: SourceLogits, temperature: float) -> SourceLogits:
    """Logits rescaled so that `temperature` calibrates them (see the module docstring)."""
    return SourceLogits(data.logits * (temperature / fitted_temperature(data.logits, data.labels)), data.labels)  # fmt: skip


def sample_label_distribution(num_classes: int, gen: torch.Generator) -> torch.Tensor:
    """A random target label distribution: uniform, Dirichlet, long-tailed or one-class."""
    k = num_classes
    kind = float(torch.rand((), generator=gen))
    if kind < 0.15:
        return torch.full((k,), 1.0 / k)
    if kind < 0.5:
        alpha = 10 ** (2 * float(torch.rand((), generator=gen)) - 1)  # 0.1 .. 10
        pi = torch._standard_gamma(torch.full((k,), alpha), generator=gen).clamp_min(1e-12)
    elif kind < 0.85:
        ratio = 10 ** (2 * float(torch.rand((), generator=gen)))  # imbalance ratio 1 .. 100
        ranks = torch.arange(k, dtype=torch.float32) / max(k - 1, 1)
        pi = (ratio ** (-ranks))[torch.randperm(k, generator=gen)]
    else:
        major = 0.5 + 0.5 * float(torch.rand((), generator=gen))
        pi = torch.full((k,), (1 - major) / max(k - 1, 1))
        pi[int(torch.randint(k, (), generator=gen))] = major
    return pi / pi.sum()


class ClassSampler:
    """Draws sample indices with given class frequencies (with replacement)."""

    def __init__(self, labels: torch.Tensor, num_classes: int) -> None:
        self.order = labels.argsort()
        self.counts = torch.bincount(labels, minlength=num_classes)
        if (self.counts == 0).any():
            raise ValueError("every class needs source samples to train the label adapter")
        self.offsets = torch.cumsum(self.counts, 0) - self.counts

    def draw(self, pi: torch.Tensor, n: int, gen: torch.Generator) -> torch.Tensor:
        classes = torch.multinomial(pi, n, replacement=True, generator=gen)
        within = (torch.rand(n, generator=gen) * self.counts[classes]).long()
        return self.order[self.offsets[classes] + within]


def estimate_prior(logits: torch.Tensor, temperature: float, source_prior: torch.Tensor, em_steps: int = 20, smoothing: float = 1e-3) -> torch.Tensor:  # fmt: skip
    """The server's estimate of a batch's prior: Saerens EM, shrunk towards uniform."""
    probs = (logits / temperature).softmax(1)
    estimate = em_prior(probs, source_prior.clone(), source_prior, em_steps)
    k = len(source_prior)
    estimate = (estimate + smoothing / k) / (1 + smoothing)
    return estimate / estimate.sum()


@dataclass(frozen=True)
class TaskBatch:
    """Several label-shifted batches concatenated, each row with its batch's estimate."""

    logits: torch.Tensor
    labels: torch.Tensor
    priors: torch.Tensor  # (N, K) the EM estimate of each row's batch
    weights: torch.Tensor  # (N,) 1 / (tasks * batch size): every batch weighs alike


def sample_tasks(data: SourceLogits, sampler: ClassSampler, source_prior: torch.Tensor, temperature: float, cfg: LabelAdapterConfig, tasks: int, gen: torch.Generator) -> TaskBatch:  # fmt: skip
    """`tasks` batches, each under its own sampled label distribution."""
    k = len(source_prior)
    rows, priors, weights = [], [], []
    low, high = math.log(cfg.min_batch), math.log(cfg.max_batch)
    for _ in range(tasks):
        n = round(math.exp(low + (high - low) * float(torch.rand((), generator=gen))))
        index = sampler.draw(sample_label_distribution(k, gen), n, gen)
        estimate = estimate_prior(data.logits[index], temperature, source_prior, cfg.em_steps, cfg.smoothing)  # fmt: skip
        rows.append(index)
        priors.append(estimate.expand(n, k))
        weights.append(torch.full((n,), 1.0 / (tasks * n)))
    picked = data.subset(torch.cat(rows))
    return TaskBatch(picked.logits, picked.labels, torch.cat(priors), torch.cat(weights))


def task_loss(adapter: LabelShiftAdapter | None, batch: TaskBatch, source_prior: torch.Tensor, loss_clip: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """(weighted, optionally truncated cross-entropy; weighted accuracy) of the adapted
    (or, without an adapter, training-free) logits."""
    logits = label_shift_correction(adapter, batch.logits, batch.priors, source_prior)
    ce = F.cross_entropy(logits, batch.labels, reduction="none")
    if loss_clip > 0:
        ce = ce.clamp_max(loss_clip)
    correct = (logits.argmax(1) == batch.labels).float()
    return (ce * batch.weights).sum(), (correct * batch.weights).sum()


def train_label_adapter(
    data: SourceLogits,
    source_prior: torch.Tensor,
    temperature: float,
    cfg: LabelAdapterConfig,
    progress: bool = True,
) -> LabelShiftAdapter:
    """Train g_phi on `data` under sampled label distributions (identity-initialised)."""
    gen = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    adapter = LabelShiftAdapter(len(source_prior), cfg.hidden)
    sampler = ClassSampler(data.labels, len(source_prior))
    opt = torch.optim.AdamW(adapter.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(cfg.steps, 1))
    bar = tqdm(range(cfg.steps), desc="label adapter", unit="step", disable=not progress)
    for _ in bar:
        batch = sample_tasks(data, sampler, source_prior, temperature, cfg, cfg.tasks_per_step, gen)  # fmt: skip
        loss, _ = task_loss(adapter, batch, source_prior, cfg.loss_clip)
        opt.zero_grad()
        loss.backward()
        opt.step()
        schedule.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
    return adapter.eval().requires_grad_(False)


@torch.no_grad()
def evaluate_adapter(adapter: LabelShiftAdapter, data: SourceLogits, source_prior: torch.Tensor, temperature: float, cfg: LabelAdapterConfig, tasks: int = 512) -> dict[str, float]:  # fmt: skip
    """Cross-entropy and accuracy of source, training-free correction and adapter on fixed
    sampled label-shift tasks of `data`."""
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    batch = sample_tasks(data, ClassSampler(data.labels, len(source_prior)), source_prior, temperature, cfg, tasks, gen)  # fmt: skip
    plain = TaskBatch(batch.logits, batch.labels, source_prior.expand_as(batch.priors), batch.weights)  # fmt: skip
    figures: dict[str, float] = {}
    for name, model, rows in (("source", None, plain), ("training_free", None, batch), ("adapter", adapter, batch)):  # fmt: skip
        loss, accuracy = task_loss(model, rows, source_prior)
        figures[f"{name}_ce"], figures[f"{name}_accuracy"] = float(loss), float(accuracy)
    return figures


def training_images(data_dir: Path, held_out_per_class: int) -> LabelledImages:
    """`train.npz` without the package's held-out calibration split."""
    train = load_npz(data_dir / "train.npz")
    if held_out_per_class <= 0:
        return train
    rest, _ = stratified_split(train.y, held_out_per_class, seed=0)
    return train.subset(rest)


def train_label_adapter_for_package(
    model_dir: Path,
    data_dir: Path,
    cfg: LabelAdapterConfig,
    held_out_per_class: int = HELD_OUT_PER_CLASS,
) -> dict[str, float]:
    """Compute logits, train, and write `label_adapter.safetensors` into the package;
    returns validation figures on sampled tasks of a split of the training images."""
    model = load_package(model_dir)
    source_prior = torch.tensor(model.card.source_prior, dtype=torch.float32)
    temperature = model.card.calibration.temperature if model.card.calibration else 1.0
    gen = torch.Generator().manual_seed(cfg.seed)
    data = source_logits(model, training_images(data_dir, held_out_per_class), gen if cfg.augment else None)  # fmt: skip
    fitted = fitted_temperature(data.logits, data.labels)
    if cfg.match_temperature:
        data = match_temperature(data, temperature)
    shuffled = torch.randperm(len(data.labels), generator=gen)
    cut = int(len(shuffled) * cfg.validation_fraction)
    validation, train = data.subset(shuffled[:cut]), data.subset(shuffled[cut:])
    adapter = train_label_adapter(train, source_prior, temperature, cfg)
    figures = {"fitted_temperature": fitted, "card_temperature": temperature}
    figures |= evaluate_adapter(adapter, validation, source_prior, temperature, cfg)
    tensors, metadata = adapter_to_tensors(adapter)
    metadata |= {
        "format": "ttaserve-label-shift-adapter",
        "model_fingerprint": model.card.fingerprint,
        "training": json.dumps(asdict(cfg)),
        "validation": json.dumps({k: round(v, 4) for k, v in figures.items()}),
    }
    save_file(tensors, model_dir / LABEL_ADAPTER_FILE, metadata=metadata)
    log.info("wrote %s", model_dir / LABEL_ADAPTER_FILE)
    return figures
