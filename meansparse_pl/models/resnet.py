"""CIFAR-style ResNet-18 (He et al., 2016) for small images (32x32, 28x28).

Differs from the ImageNet ResNet the way the adversarial-training literature's ResNet-18 does: a 3x3 stride-1
stem and no max-pool (a 7x7/2 stem plus pooling would shrink a 32x32 image to 8x8 before the first block),
and an adaptive average pool so 28x28 inputs work too. Module names (``conv1``, ``bn1``, ``layer1``...,
``shortcut``, ``linear``) follow the common CIFAR ResNet code, so its checkpoints load; the activations
(``act``, ``act1``, ``act2``) hold no parameters unless a parametric activation is chosen.
"""

from __future__ import annotations

import torch
from torch import nn

from meansparse_pl.models._registry import register_model
from meansparse_pl.models.activations import get_activation

__all__ = ["BasicBlock", "ResNet", "resnet18"]


class BasicBlock(nn.Module):
    """Post-activation residual block: act(bn(conv(act(bn(conv(x))))) + shortcut(x))."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int, activation: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.act1 = get_activation(activation)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )
        self.act2 = get_activation(activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.act2(out + self.shortcut(x))


class ResNet(nn.Module):
    """ResNet with a 3x3 stem, four stages of :class:`BasicBlock`, global average pooling and a linear head."""

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
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.act = get_activation(activation)
        in_planes = widths[0]
        stages = []
        for index, (width, blocks) in enumerate(zip(widths, num_blocks, strict=True)):
            stride = 1 if index == 0 else 2
            layers = []
            for block_stride in [stride] + [1] * (blocks - 1):
                layers.append(BasicBlock(in_planes, width, block_stride, activation))
                in_planes = width
            stages.append(nn.Sequential(*layers))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(in_planes, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.linear(torch.flatten(self.pool(out), 1))


@register_model("resnet18")
def resnet18(*, num_classes: int, in_channels: int, activation: str, base_width: int = 64) -> ResNet:
    """ResNet-18 for 32x32 / 28x28 inputs; ``base_width`` (64) scales every stage, small values for tests."""
    return ResNet((2, 2, 2, 2), num_classes, in_channels, activation, base_width)
