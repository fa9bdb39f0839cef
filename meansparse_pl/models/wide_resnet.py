"""WideResNet (Zagoruyko & Komodakis, 2016), the backbone of most adversarially trained CIFAR models.

WRN-d-k has ``(d - 4) / 6`` pre-activation blocks in each of three stages of widths 16k, 32k, 64k. The
layout and module names (``conv1``, ``block1.layer.0.bn1`` ..., ``convShortcut``, top-level ``bn1`` and
``fc``) are those of the TRADES / RobustBench ``WideResNet``, so such state dicts load directly (the
original TRADES checkpoints also carry an unused ``sub_block1``: load those with ``strict=False``).
Activations are named ``relu1``/``relu2``/``relu`` for the same reason, whatever ``activation`` is chosen.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from meansparse_pl.errors import ConfigurationError
from meansparse_pl.models._registry import register_model
from meansparse_pl.models.activations import get_activation

__all__ = ["WideBasicBlock", "WideResNet", "wrn_28_10", "wrn_34_10", "wrn_70_16"]


class WideBasicBlock(nn.Module):
    """Pre-activation block; when the shape changes, the 1x1 projection shortcut sees act(bn(x))."""

    def __init__(
        self, in_planes: int, out_planes: int, stride: int, activation: str, drop_rate: float
    ) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = get_activation(activation)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = get_activation(activation)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, stride=1, padding=1, bias=False)
        self.drop_rate = drop_rate
        self.equal_in_out = in_planes == out_planes and stride == 1
        self.convShortcut = (
            None if self.equal_in_out else nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(x))
        shortcut = x if self.convShortcut is None else self.convShortcut(out)
        out = self.relu2(self.bn2(self.conv1(out)))
        if self.drop_rate > 0:
            out = F.dropout(out, p=self.drop_rate, training=self.training)
        return self.conv2(out) + shortcut


class _NetworkBlock(nn.Module):
    def __init__(
        self, num_layers: int, in_planes: int, out_planes: int, stride: int, activation: str, drop_rate: float
    ) -> None:
        super().__init__()
        self.layer = nn.Sequential(
            *[
                WideBasicBlock(
                    in_planes if i == 0 else out_planes,
                    out_planes,
                    stride if i == 0 else 1,
                    activation,
                    drop_rate,
                )
                for i in range(num_layers)
            ]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class WideResNet(nn.Module):
    """WRN-``depth``-``widen_factor`` with a final BN + activation, global average pool and linear ``fc``."""

    def __init__(
        self,
        depth: int = 28,
        widen_factor: int = 10,
        num_classes: int = 10,
        in_channels: int = 3,
        activation: str = "relu",
        drop_rate: float = 0.0,
    ) -> None:
        super().__init__()
        if not isinstance(depth, int) or depth < 10 or (depth - 4) % 6 != 0:
            raise ConfigurationError(
                f"WideResNet depth must be 6n + 4 with n >= 1 (10, 16, 22, 28, ...), got {depth}"
            )
        if not isinstance(widen_factor, int) or widen_factor < 1:
            raise ConfigurationError(
                f"WideResNet widen_factor must be a positive integer, got {widen_factor}"
            )
        if not 0.0 <= drop_rate < 1.0:
            raise ConfigurationError(f"WideResNet drop_rate must be in [0, 1), got {drop_rate}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, stride=1, padding=1, bias=False)
        self.block1 = _NetworkBlock(n, widths[0], widths[1], 1, activation, drop_rate)
        self.block2 = _NetworkBlock(n, widths[1], widths[2], 2, activation, drop_rate)
        self.block3 = _NetworkBlock(n, widths[2], widths[3], 2, activation, drop_rate)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.relu = get_activation(activation)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[3], num_classes)
        self.num_channels = widths[3]
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Linear):
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        out = self.relu(self.bn1(out))
        return self.fc(torch.flatten(self.pool(out), 1))


def _wide_resnet(
    default_depth: int,
    default_widen: int,
    num_classes: int,
    in_channels: int,
    activation: str,
    depth: int | None,
    widen_factor: int | None,
    drop_rate: float,
) -> WideResNet:
    return WideResNet(
        depth=default_depth if depth is None else depth,
        widen_factor=default_widen if widen_factor is None else widen_factor,
        num_classes=num_classes,
        in_channels=in_channels,
        activation=activation,
        drop_rate=drop_rate,
    )


@register_model("wrn_28_10")
def wrn_28_10(
    *,
    num_classes: int,
    in_channels: int,
    activation: str,
    depth: int | None = None,
    widen_factor: int | None = None,
    drop_rate: float = 0.0,
) -> WideResNet:
    """WRN-28-10 (36.5M parameters); ``depth``/``widen_factor`` override the defaults (e.g. tiny test nets)."""
    return _wide_resnet(28, 10, num_classes, in_channels, activation, depth, widen_factor, drop_rate)


@register_model("wrn_34_10")
def wrn_34_10(
    *,
    num_classes: int,
    in_channels: int,
    activation: str,
    depth: int | None = None,
    widen_factor: int | None = None,
    drop_rate: float = 0.0,
) -> WideResNet:
    """WRN-34-10 (46.2M parameters), the TRADES / Madry CIFAR-10 backbone; ``depth``/``widen_factor``
    override the defaults."""
    return _wide_resnet(34, 10, num_classes, in_channels, activation, depth, widen_factor, drop_rate)


@register_model("wrn_70_16")
def wrn_70_16(
    *,
    num_classes: int,
    in_channels: int,
    activation: str,
    depth: int | None = None,
    widen_factor: int | None = None,
    drop_rate: float = 0.0,
) -> WideResNet:
    """WRN-70-16 (267M parameters), the size of the strongest RobustBench CIFAR models (which use a
    different, DeepMind-style block layout; this is the Zagoruyko layout); ``depth``/``widen_factor``
    override the defaults."""
    return _wide_resnet(70, 16, num_classes, in_channels, activation, depth, widen_factor, drop_rate)
