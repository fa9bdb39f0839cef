"""Networks the package has never seen, as a user brings them: defined outside meansparse_pl, given to the CLI by
``--network custom_networks.TinyNet`` (this folder is on the import path of the tests)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class TinyNet(nn.Module):
    """A 28x28 grey-image classifier with its own normalisation, a functional SiLU and a reused ReLU module."""

    def __init__(self, width: int = 6, num_classes: int = 10) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(0.286))
        self.conv1 = nn.Conv2d(1, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1, stride=2)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(2 * width * 14 * 14, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.conv1(x - self.mean))
        x = F.silu(self.conv2(x))
        return self.fc(self.relu(torch.flatten(x, 1)))
