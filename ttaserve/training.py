"""Training of the bundled demo model: a CIFAR ResNet with a one-cycle schedule on the CPU.

Chosen for accuracy per CPU minute: bf16 autocast with channels-last tensors (about 2x
fp32 on AVX-512 CPUs), flip + reflect-pad crop augmentation, label smoothing, SGD with
Nesterov momentum under a one-cycle learning rate. A checkpoint is written after every
epoch, and a run started again with the same output folder resumes from it.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from ttaserve.architectures import build_architecture
from ttaserve.datasets import LabelledImages
from ttaserve.server.decoding import images_to_tensor

log = logging.getLogger(__name__)

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


@dataclass
class TrainConfig:
    """Hyper-parameters of `train_classifier`."""

    architecture: str = "cifar_resnet20"
    epochs: int = 70
    batch_size: int = 256
    peak_lr: float = 0.2
    weight_decay: float = 5e-4
    label_smoothing: float = 0.1
    seed: int = 0
    threads: int = 0  # 0: torch's default
    bf16: bool = True


def augment(x: torch.Tensor, gen: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Random horizontal flip and reflect-padded random crop of a float batch (N, C, H, W)."""
    n, _, h, w = x.shape
    flip = torch.rand(n, generator=gen) < 0.5
    x = torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)
    padded = nn.functional.pad(x, (pad, pad, pad, pad), mode="reflect")
    dy = torch.randint(0, 2 * pad + 1, (n, 1, 1, 1), generator=gen)
    dx = torch.randint(0, 2 * pad + 1, (n, 1, 1, 1), generator=gen)
    c, pw = x.shape[1], w + 2 * pad
    rows = (dy + torch.arange(h).view(1, 1, h, 1)).expand(n, c, h, pw)
    cols = (dx + torch.arange(w).view(1, 1, 1, w)).expand(n, c, h, w)
    return padded.gather(2, rows).gather(3, cols)


@torch.no_grad()
def predict_logits(model: nn.Module, x: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """Logits of a float batch in eval mode, in chunks."""
    model.eval()
    return torch.cat([model(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])


def _comparable(config: dict, *also_ignored: str) -> dict:
    return {k: v for k, v in config.items() if k not in ("threads", *also_ignored)}


class _LinearAnneal(torch.optim.lr_scheduler.LambdaLR):
    """Linear decay of every group's LR from its value at creation to zero over `steps`."""

    def __init__(self, opt: torch.optim.Optimizer, steps: int, start_lrs: list[float] | None = None, done: int = 0) -> None:  # fmt: skip
        self.anneal_from = start_lrs or [g["lr"] for g in opt.param_groups]
        self.anneal_steps = steps
        for group, lr in zip(opt.param_groups, self.anneal_from, strict=True):
            group["initial_lr"] = lr
        self.done = done - 1  # the base class takes one step on construction
        super().__init__(opt, lambda step: max(0.0, 1.0 - (step + done) / steps))

    def step(self) -> None:  # type: ignore[override]
        self.done += 1
        super().step()


def _linear_anneal(opt, steps, start_lrs=None, done=0):  # type: ignore[no-untyped-def]
    return _LinearAnneal(opt, steps, start_lrs, done)


def _train_epoch(
    model: nn.Module,
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    gen: torch.Generator,
    cfg: TrainConfig,
    opt: torch.optim.Optimizer,
    sched: torch.optim.lr_scheduler.LRScheduler,
    criterion: nn.Module,
    steps: int,
) -> tuple[float, float]:
    """One epoch of augmented SGD steps in an order drawn from `gen`: (mean, last) loss."""
    order = torch.randperm(len(x_train), generator=gen)
    model.train()
    total = 0.0
    for step in range(steps):
        idx = order[step * cfg.batch_size : (step + 1) * cfg.batch_size]
        xb = augment(x_train[idx], gen).contiguous(memory_format=torch.channels_last)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16):
            loss = criterion(model(xb), y_train[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        last = loss.item()
        total += last
    return total / steps, last


def train_classifier(
    train: LabelledImages,
    test: LabelledImages | None,
    num_classes: int,
    out_dir: Path,
    cfg: TrainConfig,
) -> nn.Module:
    """Train (or resume) a classifier; returns the trained model in eval mode."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path = out_dir / "checkpoint.pt"
    torch.manual_seed(cfg.seed)
    model = build_architecture(cfg.architecture, num_classes).to(memory_format=torch.channels_last)
    decay = [p for n, p in model.named_parameters() if p.ndim > 1]
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1]
    opt = torch.optim.SGD(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay}],
        lr=cfg.peak_lr,
        momentum=0.9,
        nesterov=True,
    )
    steps_per_epoch = len(train) // cfg.batch_size
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, cfg.peak_lr, epochs=cfg.epochs, steps_per_epoch=steps_per_epoch, pct_start=0.25
    )
    start_epoch = 0
    if ckpt_path.exists():
        ckpt = torch.load(ckpt_path, weights_only=True)
        if _comparable(ckpt["config"], "epochs") != _comparable(asdict(cfg), "epochs"):
            raise ValueError(f"{ckpt_path} was written with another config; use a new --out")
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        start_epoch = ckpt["epoch"]
        if start_epoch > cfg.epochs:
            raise ValueError(f"checkpoint is at epoch {start_epoch}, past --epochs {cfg.epochs}")
        if ckpt.get("total_epochs", ckpt["config"]["epochs"]) != cfg.epochs:
            # a shortened (or lengthened) run: anneal linearly from the current LR to zero
            sched = _linear_anneal(opt, max(1, (cfg.epochs - start_epoch) * steps_per_epoch))
            log.info("schedule changed to %d epochs: linear anneal from here", cfg.epochs)
        elif "anneal_from" in ckpt:  # resuming inside such an anneal
            sched = _linear_anneal(opt, ckpt["anneal_steps"], ckpt["anneal_from"], ckpt["anneal_done"])  # fmt: skip
        else:
            sched.load_state_dict(ckpt["scheduler"])
        log.info("resumed from epoch %d", start_epoch)
    x_train = images_to_tensor(train.x, CIFAR10_MEAN, CIFAR10_STD)
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    for epoch in range(start_epoch, cfg.epochs):
        gen = torch.Generator().manual_seed(cfg.seed * 1000 + epoch)
        t0 = time.perf_counter()
        mean_loss, _ = _train_epoch(model, x_train, train.y, gen, cfg, opt, sched, criterion, steps_per_epoch)  # fmt: skip
        msg = {"epoch": epoch + 1, "loss": round(mean_loss, 4),
               "seconds": round(time.perf_counter() - t0, 1)}  # fmt: skip
        if test is not None and ((epoch + 1) % 5 == 0 or epoch + 1 == cfg.epochs):
            x_test = images_to_tensor(test.x, CIFAR10_MEAN, CIFAR10_STD)
            acc = (predict_logits(model, x_test).argmax(1) == test.y).float().mean().item()
            msg["test_accuracy"] = round(acc, 4)
        log.info(json.dumps(msg))
        tmp = ckpt_path.with_suffix(".tmp")
        ckpt_data = {"config": asdict(cfg), "epoch": epoch + 1, "model": model.state_dict(),
                     "optimizer": opt.state_dict(), "total_epochs": cfg.epochs}  # fmt: skip
        if isinstance(sched, _LinearAnneal):
            ckpt_data |= {"anneal_from": sched.anneal_from, "anneal_steps": sched.anneal_steps, "anneal_done": sched.done}  # fmt: skip
        else:
            ckpt_data["scheduler"] = sched.state_dict()
        torch.save(ckpt_data, tmp)
        tmp.replace(ckpt_path)
    model = model.to(memory_format=torch.contiguous_format)
    return model.eval()


def fine_tune(
    model: nn.Module,
    train: LabelledImages,
    out_dir: Path,
    cfg: TrainConfig,
    epochs: int,
    peak_lr: float,
    checkpoint_name: str = "finetune.pt",
) -> nn.Module:
    """A short warm restart after the main schedule: cosine from `peak_lr` to zero.

    Checkpointed after every epoch and resumable like the main run.
    """
    path = out_dir / checkpoint_name
    model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=peak_lr, momentum=0.9, nesterov=True, weight_decay=cfg.weight_decay)  # fmt: skip
    steps_per_epoch = len(train) // cfg.batch_size
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * steps_per_epoch)
    start = 0
    if path.exists():
        ckpt = torch.load(path, weights_only=True)
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        start = ckpt["epoch"]
    x_train = images_to_tensor(train.x, CIFAR10_MEAN, CIFAR10_STD)
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    for epoch in range(start, epochs):
        gen = torch.Generator().manual_seed(cfg.seed * 1000 + 500 + epoch)
        _, last_loss = _train_epoch(model, x_train, train.y, gen, cfg, opt, sched, criterion, steps_per_epoch)  # fmt: skip
        log.info(json.dumps({"finetune_epoch": epoch + 1, "loss": round(last_loss, 4)}))
        tmp = path.with_suffix(".tmp")
        torch.save({"epoch": epoch + 1, "model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict()}, tmp)  # fmt: skip
        tmp.replace(path)
    return model.to(memory_format=torch.contiguous_format).eval()


@torch.no_grad()
def average_weights(models: list[nn.Module]) -> dict[str, torch.Tensor]:
    """Uniform average of the floating-point weights of models of one architecture."""
    states = [m.state_dict() for m in models]
    return {
        k: torch.stack([s[k].float() for s in states]).mean(0) if v.is_floating_point() else v
        for k, v in states[0].items()
    }


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, x: torch.Tensor, batch_size: int = 500) -> None:
    """Recompute BN running statistics in fp32 on un-augmented source images (cumulative)."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average over all batches
    model.train()
    for i in range(0, len(x), batch_size):
        model(x[i : i + batch_size])
    model.eval()
