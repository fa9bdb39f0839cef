"""Streaming per-channel moments, exact to float64 and independent of batch size, order and process count.

Each site accumulates ``(count, mean, M2)`` per channel in float64 and merges partial results with the
parallel update of Chan, Golub & LeVeque (1979). The population variance ``M2 / count`` over every element
of the calibration set is what MeanSparse thresholds on; the published code instead averaged per-batch
variances, which depends on the batch size.

The accumulator is a torchmetrics ``Metric``: its three states are declared once and torchmetrics gathers
them across processes (``dist_reduce_fx=None`` stacks one copy per process); ``compute`` then merges the
stacked copies exactly with the same Chan rule.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torchmetrics import Metric


@dataclass  # not frozen: torchmetrics post-processes compute() results field by field
class Moments:
    """Per-channel count, mean and sum of squared deviations (M2), float64."""

    count: Tensor  # scalar: elements per channel
    mean: Tensor  # [C]
    m2: Tensor  # [C]

    @property
    def var(self) -> Tensor:
        """Population variance (divides by count, not count - 1)."""
        return self.m2 / self.count.clamp_min(1)


def merge_moments(a: Moments, b: Moments) -> Moments:
    """Exact merge of two partial results (Chan et al.): the result equals a single pass over both parts."""
    count = a.count + b.count
    delta = b.mean - a.mean
    # clamp: two empty parts stay empty without a division by zero (and without a host sync on GPU)
    weight_b = b.count / count.clamp_min(1)
    mean = a.mean + delta * weight_b
    m2 = a.m2 + b.m2 + delta.square() * (a.count * weight_b)
    return Moments(count, mean, m2)


def batch_moments(x: Tensor, channel_dim: int) -> Moments:
    """Moments of one batch, every axis but ``channel_dim`` reduced, computed in float64."""
    channel_dim = channel_dim % x.dim()
    reduce_dims = [d for d in range(x.dim()) if d != channel_dim]
    values = x.detach().to(torch.float64)
    count = torch.tensor(float(x.numel() // x.shape[channel_dim]), dtype=torch.float64, device=x.device)
    mean = values.mean(dim=reduce_dims)
    shape = [1] * x.dim()
    shape[channel_dim] = x.shape[channel_dim]
    m2 = (values - mean.view(shape)).square_().sum(dim=reduce_dims)
    return Moments(count, mean, m2)


class ChannelMoments(Metric):
    """Per-channel moments of one site's input, synchronised across processes by torchmetrics."""

    full_state_update = False
    is_differentiable = False

    def __init__(self, num_channels: int, channel_dim: int = 1, **kwargs) -> None:
        super().__init__(**kwargs)
        self.num_channels = num_channels
        self.channel_dim = channel_dim
        # dist_reduce_fx=None: every process's copy is gathered and stacked; compute() merges them exactly.
        self.add_state("count", torch.zeros((), dtype=torch.float64), dist_reduce_fx=None)
        self.add_state("mean", torch.zeros(num_channels, dtype=torch.float64), dist_reduce_fx=None)
        self.add_state("m2", torch.zeros(num_channels, dtype=torch.float64), dist_reduce_fx=None)

    def update(self, x: Tensor) -> None:
        merged = merge_moments(self._local(), batch_moments(x, self.channel_dim))
        self.count, self.mean, self.m2 = merged.count, merged.mean, merged.m2

    def _local(self) -> Moments:
        return Moments(self.count, self.mean, self.m2)

    def compute(self) -> Moments:
        if self.count.dim() == 0:
            return self._local()
        # After a distributed sync the states are stacked [world_size, ...]: merge process by process.
        total = Moments(self.count[0], self.mean[0], self.m2[0])
        for rank in range(1, self.count.shape[0]):
            total = merge_moments(total, Moments(self.count[rank], self.mean[rank], self.m2[rank]))
        return total

    def set_dtype(self, dst_type: torch.dtype) -> Metric:
        # Lightning or the user casting the model to half must never lower the accumulator's precision.
        return self
