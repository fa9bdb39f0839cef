"""A small CNN for 28x28 grey images (Fashion-MNIST), fast enough to adversarially train on two CPU cores.

conv(32)-BN-act-pool, conv(64)-BN-act-pool, fc(128)-act, fc(classes): about 4 MFLOPs per image forward,
so an epoch of Fashion-MNIST takes well under a minute on a laptop CPU. It has three activations (two
convolutional, one fully connected), which gives MeanSparse both conv-channel and feature statistics to work on.
"""

from __future__ import annotations

import torch
from torch import nn

from meansparse_pl.errors import ConfigurationError
from meansparse_pl.models._registry import register_model
from meansparse_pl.models.activations import get_activation

__all__ = ["SmallCNN", "small_cnn"]


class SmallCNN(nn.Module):
    """Two conv stages (each conv3x3 + BN + activation + 2x2 max-pool) and a two-layer MLP head."""

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        activation: str = "relu",
        channels: tuple[int, int] = (32, 64),
        hidden: int = 128,
        input_size: int = 28,
    ) -> None:
        super().__init__()
        if len(channels) != 2 or min(channels) < 1 or hidden < 1:
            raise ConfigurationError(
                f"SmallCNN needs two positive channel counts and hidden >= 1, got {channels}, {hidden}"
            )
        if input_size < 4:
            raise ConfigurationError(f"SmallCNN input_size must be >= 4 (two 2x2 poolings), got {input_size}")
        c1, c2 = channels
        self.conv1 = nn.Conv2d(in_channels, c1, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c1)
        self.act1 = get_activation(activation)
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c2)
        self.act2 = get_activation(activation)
        self.pool2 = nn.MaxPool2d(2)
        spatial = input_size // 2 // 2
        self.fc1 = nn.Linear(c2 * spatial * spatial, hidden)
        self.act3 = get_activation(activation)
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.pool1(self.act1(self.bn1(self.conv1(x))))
        out = self.pool2(self.act2(self.bn2(self.conv2(out))))
        return self.fc2(self.act3(self.fc1(torch.flatten(out, 1))))


@register_model("small_cnn")
def small_cnn(
    *,
    num_classes: int,
    in_channels: int,
    activation: str,
    channels: tuple[int, int] = (32, 64),
    hidden: int = 128,
    input_size: int = 28,
) -> SmallCNN:
    """Small CNN; ``input_size`` (28) is the square input side the first fully connected layer is sized for."""
    return SmallCNN(num_classes, in_channels, activation, tuple(channels), hidden, input_size)
