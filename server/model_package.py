"""Model packages: a folder of weights plus a `model.json` card.

Formats:
- `state_dict`: `weights.safetensors` for an architecture of `ttaserve.architectures`;
- `torch_export`: a `model.pt2` program from `torch.export`, whose batch norms are
  rewritten into stream norms at load time.
Calibration figures measured on held-out labelled source data live in the card;
calibration arrays (the confusion matrix) in `calibration.safetensors`; an optional
trained label shift adapter in `label_adapter.safetensors`.
Nothing is downloaded and nothing is unpickled.
"""

from __future__ import annotations

import hashlib
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, Field, field_validator
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from ttaserve.adapters.class_moments import class_conditional_moments
from ttaserve.adapters.label_shift_adapter import LabelShiftAdapter, adapter_from_tensors
from ttaserve.adapters.stream_norm import (
    NormContext,
    StreamNorm,
    active_context,
    convert_batchnorm_modules,
    source_statistics,
    tap_classifier_features,
)
from ttaserve.architectures import build_architecture
from ttaserve.server.decoding import ResizePolicy, images_to_tensor
from ttaserve.server.graph_rewrite import load_exported_program

CARD_FILE = "model.json"
CALIBRATION_FILE = "calibration.safetensors"
LABEL_ADAPTER_FILE = "label_adapter.safetensors"
WEIGHTS_FILES = {"state_dict": "weights.safetensors", "torch_export": "model.pt2"}


class InputSpec(BaseModel):
    """What the model takes: image size, channels, normalization and resize policy."""

    height: int = Field(gt=0)
    width: int = Field(gt=0)
    channels: int = Field(ge=1, le=4)
    mean: list[float]
    std: list[float]
    resize: ResizePolicy = "resize"

    @field_validator("std")
    @classmethod
    def _positive(cls, v: list[float]) -> list[float]:
        if any(s <= 0 for s in v):
            raise ValueError("std entries must be > 0")
        return v


class Calibration(BaseModel):
    """Figures measured on held-out labelled source data at packaging time."""

    samples: int
    accuracy: float
    mean_entropy: float
    mean_confidence: float
    atc_threshold: float  # ATC (Garg et al. 2022): confidence quantile at 1 - accuracy
    energy_threshold: float  # logsumexp score at 95% true-positive rate on source data
    energy_mean: float | None = None  # logsumexp mean and std on source data
    energy_std: float | None = None
    temperature: float  # NLL-optimal softmax temperature


class ModelCard(BaseModel):
    """The `model.json` of a package."""

    schema_version: Literal[1] = 1
    name: str = Field(pattern=r"^[A-Za-z0-9._-]{1,64}$")
    format: Literal["state_dict", "torch_export"]
    architecture: str | None = None
    fingerprint: str
    input: InputSpec
    class_names: list[str]
    source_prior: list[float]
    calibration: Calibration | None = None
    provenance: dict[str, Any] = Field(default_factory=dict)

    @property
    def weights_file(self) -> str:
        return WEIGHTS_FILES[self.format]


@dataclass
class LoadedModel:
    """A package loaded for serving: the stream-norm model and what policies need."""

    card: ModelCard
    module: nn.Module
    layers: list[StreamNorm]
    directory: Path
    confusion: torch.Tensor | None  # (K, K) P(predicted=i, true=j) on source data
    # per BN layer: class-conditional input means and variances (K, C) on source data
    class_moments: list[tuple[torch.Tensor, torch.Tensor]] | None = None
    label_adapter: LabelShiftAdapter | None = None  # `ttaserve train-label-adapter`

    @property
    def num_classes(self) -> int:
        return len(self.card.class_names)


def file_fingerprint(path: Path) -> str:
    """sha256 of a weights file: stamps every stream state written for this model."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_package(directory: str | Path) -> LoadedModel:
    """Load and verify a package folder; the model comes back in eval mode, BNs rewritten."""
    directory = Path(directory)
    card_path = directory / CARD_FILE
    if not card_path.is_file():
        raise FileNotFoundError(f"{directory} is not a model package: no {CARD_FILE}")
    card = ModelCard.model_validate_json(card_path.read_text())
    weights = directory / card.weights_file
    if file_fingerprint(weights) != card.fingerprint:
        raise ValueError(
            f"{weights}: fingerprint does not match {CARD_FILE}; the package is corrupt"
        )
    if card.format == "state_dict":
        if card.architecture is None:
            raise ValueError(f"{card_path}: a state_dict package needs an architecture")
        module = build_architecture(card.architecture, len(card.class_names))
        module.load_state_dict(load_file(weights))
        module.eval()
        layers = convert_batchnorm_modules(module)
        tap_classifier_features(module)
    else:
        module, layers = load_exported_program(str(weights))
    module.requires_grad_(False)
    confusion, class_moments = None, None
    if (directory / CALIBRATION_FILE).is_file():
        tensors = load_file(directory / CALIBRATION_FILE)
        confusion = tensors.get("confusion")
        class_moments = _class_moments(tensors, len(layers))
    label_adapter = _label_adapter(directory, card)
    return LoadedModel(card, module, layers, directory, confusion, class_moments, label_adapter)


def _label_adapter(directory: Path, card: ModelCard) -> LabelShiftAdapter | None:
    """The package's trained label shift adapter, if it has one (safetensors, no pickle)."""
    path = directory / LABEL_ADAPTER_FILE
    if not path.is_file():
        return None
    with safe_open(path, framework="pt") as f:
        metadata = f.metadata() or {}
        tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (not a dict)
    if metadata.get("model_fingerprint") != card.fingerprint:
        raise ValueError(f"{path} was trained for other weights; retrain it with `ttaserve train-label-adapter`")  # fmt: skip
    adapter = adapter_from_tensors(tensors, metadata)
    if adapter.num_classes != len(card.class_names):
        raise ValueError(f"{path} has {adapter.num_classes} classes, the model {len(card.class_names)}")  # fmt: skip
    return adapter


def _class_moments(tensors: dict[str, torch.Tensor], num_layers: int) -> list[tuple[torch.Tensor, torch.Tensor]] | None:  # fmt: skip
    """Per-layer class-conditional moments from calibration tensors, if all are there."""
    keys = [(f"class_mean.{layer}", f"class_var.{layer}") for layer in range(num_layers)]
    if not keys or any(m not in tensors or v not in tensors for m, v in keys):
        return None
    return [(tensors[m], tensors[v]) for m, v in keys]


def write_package(
    directory: str | Path,
    *,
    name: str,
    input_spec: InputSpec,
    class_names: list[str],
    state_dict: dict[str, torch.Tensor] | None = None,
    architecture: str | None = None,
    exported_program: str | Path | None = None,
    source_prior: list[float] | None = None,
    provenance: dict[str, Any] | None = None,
) -> ModelCard:
    """Write a package from a state_dict (+ architecture) or a `.pt2` file (uncalibrated)."""
    if (state_dict is None) == (exported_program is None):
        raise ValueError("give exactly one of state_dict or exported_program")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    fmt: Literal["state_dict", "torch_export"] = "state_dict" if state_dict is not None else "torch_export"  # fmt: skip
    weights = directory / WEIGHTS_FILES[fmt]
    if state_dict is not None:
        if architecture is None:
            raise ValueError("a state_dict package needs an architecture name")
        build_architecture(architecture, len(class_names))  # fails early on unknown names
        save_file({k: v.detach().contiguous() for k, v in state_dict.items()}, weights)
    else:
        shutil.copyfile(exported_program, weights)
    k = len(class_names)
    card = ModelCard(
        name=name,
        format=fmt,
        architecture=architecture,
        fingerprint=file_fingerprint(weights),
        input=input_spec,
        class_names=class_names,
        source_prior=source_prior or [1.0 / k] * k,
        provenance=provenance or {},
    )
    (directory / CARD_FILE).write_text(card.model_dump_json(indent=2) + "\n")
    return card


def _entropy(probs: torch.Tensor) -> torch.Tensor:
    return -(probs * probs.clamp_min(1e-12).log()).sum(1)


def _best_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    grid = torch.linspace(0.5, 3.0, 51)
    nll = [nn.functional.cross_entropy(logits / t, labels).item() for t in grid]
    return float(grid[int(np.argmin(nll))])


def _source_pass(model: LoadedModel, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:  # fmt: skip
    """Source logits, and every BN layer's class-conditional input moments, of labelled `x`."""
    logits, moments = [], [[] for _ in model.layers]
    for start in range(0, len(x), 500):
        ctx = NormContext(statistics=source_statistics)
        with active_context(ctx):
            logits.append(model.module(x[start : start + 500]))
        for layer, (mean, var) in ctx.moments.items():
            moments[layer].append((mean, var))
    tensors: dict[str, torch.Tensor] = {}
    for layer, parts in enumerate(moments):
        mean, var = torch.cat([m for m, _ in parts]), torch.cat([v for _, v in parts])
        class_mean, class_var = class_conditional_moments(mean, var, y, model.num_classes)
        tensors[f"class_mean.{layer}"], tensors[f"class_var.{layer}"] = class_mean.contiguous(), class_var.contiguous()  # fmt: skip
    return torch.cat(logits), tensors


@torch.no_grad()
def calibrate_package(directory: str | Path, images: np.ndarray, labels: np.ndarray) -> Calibration:
    """Measure calibration figures of the source model on held-out labelled data (uint8 NHWC)."""
    model = load_package(directory)
    spec = model.card.input
    if images.shape[1:] != (spec.height, spec.width, spec.channels):
        raise ValueError(f"calibration images are {images.shape[1:]}, the model takes {(spec.height, spec.width, spec.channels)}")  # fmt: skip
    x = images_to_tensor(images, tuple(spec.mean), tuple(spec.std))
    y = torch.as_tensor(labels, dtype=torch.int64)
    logits, class_moments = _source_pass(model, x, y)
    probs = logits.softmax(1)
    confidence, predicted = probs.max(1)
    accuracy = (predicted == y).float().mean().item()
    energy = torch.logsumexp(logits, 1)
    k = model.num_classes
    confusion = torch.zeros(k, k)
    confusion.index_put_((predicted, y), torch.ones(len(y)), accumulate=True)
    calibration = Calibration(
        samples=len(y),
        accuracy=accuracy,
        mean_entropy=_entropy(probs).mean().item(),
        mean_confidence=confidence.mean().item(),
        atc_threshold=torch.quantile(confidence, max(0.0, 1.0 - accuracy)).item(),
        energy_threshold=torch.quantile(energy, 0.05).item(),
        energy_mean=energy.mean().item(),
        energy_std=energy.std().item(),
        temperature=_best_temperature(logits, y),
    )
    card = model.card.model_copy(update={"calibration": calibration})
    directory = Path(directory)
    save_file({"confusion": confusion / len(y), **class_moments}, directory / CALIBRATION_FILE)
    (directory / CARD_FILE).write_text(card.model_dump_json(indent=2) + "\n")
    assert math.isfinite(calibration.mean_entropy)
    return calibration
