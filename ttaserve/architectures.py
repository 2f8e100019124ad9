"""Registry of model architectures that a state_dict package may name.

The project's own CIFAR ResNets (He et al., 2016, option-B shortcuts) are always
available; torchvision architectures are added when torchvision is installed.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

ArchitectureFactory = Callable[[int], nn.Module]


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with batch norm and a projection shortcut when shapes change."""

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32x32 inputs with three stages of `widths` channels."""

    def __init__(self, depth: int, num_classes: int, widths: tuple[int, int, int] = (16, 32, 64)):
        super().__init__()
        if (depth - 2) % 6 != 0:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        layers: list[nn.Module] = []
        in_planes = widths[0]
        for stage, planes in enumerate(widths):
            for i in range(n):
                stride = 2 if stage > 0 and i == 0 else 1
                layers.append(BasicBlock(in_planes, planes, stride))
                in_planes = planes
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(in_planes, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        for m in self.modules():  # zero-init the last BN of each block: a standard trick
            if isinstance(m, BasicBlock):
                nn.init.zeros_(m.bn2.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.layers(out)
        out = torch.flatten(nn.functional.adaptive_avg_pool2d(out, 1), 1)
        return self.fc(out)


ARCHITECTURES: dict[str, ArchitectureFactory] = {
    "cifar_resnet20": lambda c: CifarResNet(20, c),
    "cifar_resnet26": lambda c: CifarResNet(26, c),
    "cifar_resnet32": lambda c: CifarResNet(32, c),
    "cifar_resnet20_w2": lambda c: CifarResNet(20, c, (32, 64, 128)),
}


def _torchvision_factory(name: str) -> ArchitectureFactory | None:
    try:
        import torchvision.models as tvm  # optional dependency
    except Exception:  # torchvision missing or broken beside this torch build
        return None
    builder = getattr(tvm, name, None)
    if builder is None:
        return None
    return lambda c: builder(weights=None, num_classes=c)


def build_architecture(name: str, num_classes: int) -> nn.Module:
    """Instantiate a registered architecture (no weights are downloaded)."""
    factory = ARCHITECTURES.get(name)
    if factory is None and name.startswith("torchvision."):
        factory = _torchvision_factory(name.removeprefix("torchvision."))
    if factory is None:
        known = ", ".join(sorted(ARCHITECTURES))
        raise ValueError(
            f"unknown architecture {name!r}: use one of {known}, "
            "or 'torchvision.<name>' with torchvision installed"
        )
    return factory(num_classes)
