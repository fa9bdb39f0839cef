"""Pre-activation ResNet-18 (He et al., 2016, "Identity mappings in deep residual networks").

The architecture of Rice et al. (2020) and many RobustBench entries: BN and activation come BEFORE each
convolution, and the network ends with a final BN + activation. Module names (``conv1``, ``layer1``...,
``bn1``/``bn2``/``shortcut`` inside blocks, ``bn``, ``linear``) follow that code so its checkpoints load.
"""

from __future__ import annotations

import torch
from torch import nn

from meansparse_pl.models._registry import register_model
from meansparse_pl.models.activations import get_activation

__all__ = ["PreActBlock", "PreActResNet", "preact_resnet18"]


class PreActBlock(nn.Module):
    """conv(act(bn(conv(act(bn(x)))))) + shortcut, where a projection shortcut sees act(bn(x))."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int, activation: str) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.act1 = get_activation(activation)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.act2 = get_activation(activation)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act1(self.bn1(x))
        shortcut = x if self.shortcut is None else self.shortcut(out)
        out = self.conv1(out)
        out = self.conv2(self.act2(self.bn2(out)))
        return out + shortcut


class PreActResNet(nn.Module):
    """Pre-activation ResNet with a 3x3 stem, final BN + activation, global average pool and linear head."""

    def __init__(
        self,
        num_blocks: tuple[int, int, int, int] = (2, 2, 2, 2),
        num_classes: int = 10,
        in_channels: int = 3,
        activation: str = "relu",
        base_width: int = 64,
    ) -> None:
        super().__init__()
        widths = [base_width, 2 * base_width, 4 * base_width, 8 * base_width]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, stride=1, padding=1, bias=False)
        in_planes = widths[0]
        stages = []
        for index, (width, blocks) in enumerate(zip(widths, num_blocks, strict=True)):
            stride = 1 if index == 0 else 2
            layers = []
            for block_stride in [stride] + [1] * (blocks - 1):
                layers.append(PreActBlock(in_planes, width, block_stride, activation))
                in_planes = width
            stages.append(nn.Sequential(*layers))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.bn = nn.BatchNorm2d(in_planes)
        self.act = get_activation(activation)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(in_planes, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(x)
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = self.act(self.bn(out))
        return self.linear(torch.flatten(self.pool(out), 1))


@register_model("preact_resnet18")
def preact_resnet18(
    *, num_classes: int, in_channels: int, activation: str, base_width: int = 64
) -> PreActResNet:
    """Pre-activation ResNet-18; ``base_width`` (64) scales every stage, small values for tests."""
    return PreActResNet((2, 2, 2, 2), num_classes, in_channels, activation, base_width)
