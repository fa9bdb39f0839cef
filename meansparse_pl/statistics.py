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

from meansparse_pl import operator as op_module  # the fused-kernel switch, size threshold and layout mapping


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


def _moments_kernel(x: Tensor, shift: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and centred sum of squares (M2) of an ``(outer, C, inner)`` tensor, in float64.

    One read of ``x``: each element is widened to float64 in registers (no float64 copy of the activation is
    stored) and accumulated as ``d = x - shift`` and ``d * d``, where the per-channel ``shift`` (float64,
    shape ``(1, C, 1)``) is the mean of the channel's first few hundred elements. With a shift that close to
    the mean the shifted formula ``M2 = sum(d^2) - sum(d)^2 / n`` loses almost nothing to cancellation: its
    relative error is about ``n_eff * eps64 * (1 + ((mean - shift) / sigma)^2)``, far below the float32
    rounding of the features themselves.
    """
    d = x.to(torch.float64) - shift
    count = x.shape[0] * x.shape[2]
    s1 = d.sum(dim=(0, 2))
    s2 = (d * d).sum(dim=(0, 2))
    return shift.view(-1) + s1 / count, (s2 - s1 * s1 / count).clamp_min(0.0)


SHIFT_SAMPLE = 256
"""Elements per channel (at least) whose mean is the shift of the one-pass fused moments kernel."""


def _fused_moments(x: Tensor, channel_dim: int) -> tuple[Tensor, Tensor] | None:
    """The compiled CPU kernel for large float inputs; None where it does not apply or cannot compile."""
    if not (op_module._fused_applicable(x) and not op_module._tracing()):
        return None
    mapped = op_module._canonical(x, channel_dim)
    if mapped is None:
        return None
    x3 = mapped[0]
    head = x3[: -(-SHIFT_SAMPLE // x3.shape[2])]  # ceil(SHIFT_SAMPLE / inner) leading rows
    shift = head.mean(dim=(0, 2), keepdim=True, dtype=torch.float64)
    ok, result = op_module._run_compiled(_moments_kernel, x3, shift)
    return result if ok else None  # type: ignore[return-value]


def batch_moments(x: Tensor, channel_dim: int) -> Moments:
    """Moments of one batch, every axis but ``channel_dim`` reduced, computed in float64.

    On CPU, large inputs go through one compiled kernel that reads ``x`` once, widening to float64 in
    registers (see :func:`_moments_kernel`); elsewhere a float64 copy is reduced in eager mode by the two-pass
    formula.
    """
    channel_dim = channel_dim % x.dim()
    x = x.detach()
    count = torch.tensor(float(x.numel() // x.shape[channel_dim]), dtype=torch.float64, device=x.device)
    fused = _fused_moments(x, channel_dim)
    if fused is not None:
        mean, m2 = fused
        return Moments(count, mean, m2)
    reduce_dims = [d for d in range(x.dim()) if d != channel_dim]
    values = x.to(torch.float64, copy=True)  # our own copy: centred in place below
    mean = values.mean(dim=reduce_dims)
    shape = [1] * x.dim()
    shape[channel_dim] = x.shape[channel_dim]
    m2 = values.sub_(mean.view(shape)).square_().sum(dim=reduce_dims)
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
