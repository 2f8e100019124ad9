"""The `ttaserve` command: serve, package, train-demo, train-label-adapter (and the benchmarks)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from ttaserve.server.app import create_app
    from ttaserve.server.settings import Settings

    overrides = {k: v for k, v in {"model": args.model, "host": args.host, "port": args.port, "default_policy": args.policy}.items() if v is not None}  # fmt: skip
    settings = Settings(**overrides)
    app = create_app(settings)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=settings.log_level, timeout_graceful_shutdown=30)  # fmt: skip
    return 0


def _read_classes(value: str) -> list[str]:
    path = Path(value)
    if path.is_file():
        return [line.strip() for line in path.read_text().splitlines() if line.strip()]
    return [c.strip() for c in value.split(",") if c.strip()]


def _floats(value: str) -> list[float]:
    return [float(v) for v in value.split(",")]


def _package(args: argparse.Namespace) -> int:
    from safetensors.torch import load_file

    from ttaserve.server.model_package import InputSpec, calibrate_package, write_package

    classes = _read_classes(args.classes)
    spec = InputSpec(height=args.height, width=args.width, channels=args.channels, mean=_floats(args.mean), std=_floats(args.std), resize=args.resize)  # fmt: skip
    weights = Path(args.weights)
    common = {"name": args.name, "input_spec": spec, "class_names": classes, "provenance": {"packaged_from": weights.name}}  # fmt: skip
    if weights.suffix == ".pt2":
        write_package(args.out, exported_program=weights, **common)
    elif weights.suffix == ".safetensors":
        if not args.architecture:
            sys.exit("--architecture is required with a .safetensors state_dict")
        write_package(args.out, state_dict=load_file(weights), architecture=args.architecture, **common)  # fmt: skip
    else:
        sys.exit("--weights must be a torch.export .pt2 file or a .safetensors state_dict")
    if args.calibration_data:
        with np.load(args.calibration_data, allow_pickle=False) as data:
            calibration = calibrate_package(args.out, data["x"], data["y"])
        print(json.dumps(calibration.model_dump(), indent=2))
    print(f"wrote model package {args.out}")
    return 0


def _train_demo(args: argparse.Namespace) -> int:
    from ttaserve.demo_model import train_demo_model
    from ttaserve.training import TrainConfig

    cfg = TrainConfig(epochs=args.epochs, threads=args.threads)
    restarts = [(int(e), float(lr)) for e, lr in (r.split(":") for r in args.restarts.split(",") if r)]  # fmt: skip
    accuracy = train_demo_model(Path(args.data), Path(args.out), Path(args.work), cfg, restarts)
    print(f"demo model written to {args.out}: CIFAR-10 test accuracy {accuracy:.4f}")
    return 0


def _train_label_adapter(args: argparse.Namespace) -> int:
    import torch

    from ttaserve.datasets import default_cifar10_dir
    from ttaserve.label_adapter_training import LabelAdapterConfig, train_label_adapter_for_package

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = LabelAdapterConfig(steps=args.steps, seed=args.seed)
    data = Path(args.data) if args.data else default_cifar10_dir()
    held_out = {} if args.held_out_per_class is None else {"held_out_per_class": args.held_out_per_class}  # fmt: skip
    figures = train_label_adapter_for_package(Path(args.model), data, cfg, **held_out)
    print(json.dumps({k: round(v, 4) for k, v in figures.items()}, indent=2))
    print(f"wrote {Path(args.model) / 'label_adapter.safetensors'}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    if args.kind == "accuracy":
        from ttaserve.bench.accuracy import main as bench_main
    else:
        from ttaserve.clients.bench_serve import main as bench_main
    return bench_main(args.options)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ttaserve", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="serve a model package over HTTP")
    serve.add_argument("--model", help="model package folder (default: the bundled demo model)")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument("--policy", help="default adaptation policy")
    serve.set_defaults(func=_serve)

    package = sub.add_parser("package", help="build a model package from a .pt2 or state_dict")
    package.add_argument("--weights", required=True, help="torch.export .pt2, or .safetensors state_dict")  # fmt: skip
    package.add_argument("--architecture", help="registered architecture of a state_dict")
    package.add_argument("--classes", required=True, help="class names: a comma list or a file, one per line")  # fmt: skip
    package.add_argument("--mean", required=True, help="per-channel mean, e.g. 0.485,0.456,0.406")
    package.add_argument("--std", required=True, help="per-channel std")
    package.add_argument("--height", type=int, required=True)
    package.add_argument("--width", type=int, required=True)
    package.add_argument("--channels", type=int, default=3)
    package.add_argument("--resize", default="resize", choices=["resize", "center_crop", "exact"])
    package.add_argument("--name", required=True, help="model name ([A-Za-z0-9._-])")
    package.add_argument("--calibration-data", help="labelled held-out npz (x uint8 NHWC, y) to calibrate on")  # fmt: skip
    package.add_argument("--out", required=True, help="package folder to write")
    package.set_defaults(func=_package)

    train = sub.add_parser("train-demo", help="train and package the bundled CIFAR-10 demo model")
    train.add_argument("--data", required=True, help="folder with train.npz and test.npz")
    train.add_argument("--out", default="models/cifar10-resnet20", help="package folder to write")
    train.add_argument("--work", default=".cache/train-demo", help="checkpoint folder (resumable)")
    train.add_argument("--epochs", type=int, default=70)
    train.add_argument("--threads", type=int, default=0)
    train.add_argument("--restarts", default="", help="warm restarts after the main schedule, averaged: EPOCHS:PEAK_LR,... e.g. 8:0.03,12:0.08")  # fmt: skip
    train.set_defaults(func=_train_demo)

    lsa = sub.add_parser("train-label-adapter", help="train a package's label shift adapter on labelled source data")  # fmt: skip
    lsa.add_argument("--model", required=True, help="model package folder; label_adapter.safetensors is written there")  # fmt: skip
    lsa.add_argument("--data", help="folder with the source train.npz (default: the shared CIFAR-10)")  # fmt: skip
    lsa.add_argument("--held-out-per-class", type=int, help="per-class calibration split of train.npz to leave out (seed 0; default: train-demo's); 0: none")  # fmt: skip
    lsa.add_argument("--steps", type=int, default=600)
    lsa.add_argument("--seed", type=int, default=0)
    lsa.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    lsa.set_defaults(func=_train_label_adapter)

    bench = sub.add_parser("bench", help="benchmarks: 'accuracy' (adaptation) or 'serve' (throughput)")  # fmt: skip
    bench.add_argument("kind", choices=["accuracy", "serve"])
    bench.add_argument("options", nargs=argparse.REMAINDER, help="options of the benchmark (see --help)")  # fmt: skip
    bench.set_defaults(func=_bench)
    return parser


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")  # fmt: skip
    args = build_parser().parse_args(argv)
    sys.exit(args.func(args))
