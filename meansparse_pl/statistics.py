"""Streaming per-channel moments, exact to float64 and independent of batch size, order and process count.

Each site accumulates ``(count, mean, M2)`` per channel in float64 and merges partial results with the
parallel update of Chan, Golub & LeVeque (1979). The population variance ``M2 / count`` over every element
of the calibration set is what MeanSparse thresholds on; the published code instead averaged per-batch
variances, which depends on the batch size.

The accumulator is a torchmetrics ``Metric`` (:class:`OperatorMoments`): its states are declared once and
torchmetrics gathers them across processes; ``compute`` merges the stacked copies exactly with the same Chan
rule. The math (:func:`batch_moments`, :func:`merge_moments`) is a functional layer below it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric

from meansparse_pl.ops import kernels  # the fused-kernel switch, size threshold and layout mapping


@dataclass  # not frozen: torchmetrics post-processes compute() results field by field
class Moments:
    """Per-channel count, mean and sum of squared deviations (M2), float64.

    ``count`` is a scalar tensor for accumulated moments and a Python float for one batch's (a number the host
    already knows: no tensor is built on the device for it, which would be a host-device copy per batch)."""

    count: Tensor | float  # elements per channel
    mean: Tensor  # [C]
    m2: Tensor  # [C]

    @property
    def var(self) -> Tensor:
        """Population variance (divides by count, not count - 1)."""
        return self.m2 / _at_least_one(self.count)


def _at_least_one(count: Tensor | float) -> Tensor | float:
    # two empty parts stay empty without a division by zero (and without a host sync on GPU)
    return count.clamp_min(1) if isinstance(count, Tensor) else max(count, 1.0)


def merge_moments(a: Moments, b: Moments) -> Moments:
    """Exact merge of two partial results (Chan et al.): the result equals a single pass over both parts."""
    count = a.count + b.count
    delta = b.mean - a.mean
    weight_b = b.count / _at_least_one(count)
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
    """The compiled kernel for large float inputs; None where it does not apply or cannot compile."""
    if not (kernels.fused_applicable(x) and not kernels.tracing()):
        return None
    mapped = kernels.canonical(x, channel_dim)
    if mapped is None:
        return None
    x3 = mapped[0]
    head = x3[: -(-SHIFT_SAMPLE // x3.shape[2])]  # ceil(SHIFT_SAMPLE / inner) leading rows
    shift = head.mean(dim=(0, 2), keepdim=True, dtype=torch.float64)
    ok, result = kernels.run_compiled(_moments_kernel, x3, shift)
    return result if ok else None  # type: ignore[return-value]


PARTIAL_CHUNK_NUMEL = 1 << 22
"""Elements of ``x`` centred at a time by the eager moments (a bound on their temporary)."""


def _partial_moments(x: Tensor, channel_dim: int) -> tuple[Tensor, Tensor]:
    """Eager moments without a float64 copy of ``x``: centred on a per-channel float32 shift (the channel's mean
    in the first sample; near the data, ``x - shift`` is exact), ``var_mean`` per (sample, channel) over the
    remaining axes in float32 (float64 for float64 data), then the per-sample parts, which all hold the same
    number of elements, merged exactly in float64 (Chan's rule for equal counts). The temporary covers at most
    :data:`PARTIAL_CHUNK_NUMEL` elements; the only float64 tensors are ``(N, C)``.
    """
    work = torch.float64 if x.dtype == torch.float64 else torch.float32  # float64 data keeps its precision
    dims = [d for d in range(x.dim()) if d != channel_dim]
    first = x.narrow(0, 0, 1) if channel_dim != 0 else x
    shift = first.to(work).mean(dim=dims, keepdim=True)  # (1, C, 1, ...)
    if channel_dim == 0 or x.dim() == 2:  # no per-sample grouping: one var_mean over the other axes
        var, mean = torch.var_mean(x.to(work) - shift, dim=dims, correction=0)
        count = x.numel() // x.shape[channel_dim]
        return shift.view(-1).double() + mean.double(), var.double() * count
    within = dims[1:]  # the axes of one sample, channel excluded
    per_sample = x.numel() // (x.shape[0] * x.shape[channel_dim])
    step = max(1, PARTIAL_CHUNK_NUMEL // max(x[0].numel(), 1))
    parts = [torch.var_mean(chunk.to(work) - shift, dim=within, correction=0) for chunk in x.split(step)]
    var = torch.cat([p[0] for p in parts]).double()  # (N, C)
    mean = torch.cat([p[1] for p in parts]).double()
    total = mean.mean(dim=0)
    m2 = (var.sum(dim=0) + (mean - total).square_().sum(dim=0)) * per_sample
    return shift.view(-1).double() + total, m2


def batch_moments(x: Tensor, channel_dim: int) -> Moments:
    """Moments of one batch, every axis but ``channel_dim`` reduced, exact to float64 rounding.

    On CPU and CUDA, large inputs go through one compiled kernel that reads ``x`` once, widening to float64 in
    registers (see :func:`_moments_kernel`); elsewhere :func:`_partial_moments` reduces in eager mode without a
    float64 copy of the activation.
    """
    channel_dim = channel_dim % x.dim()
    x = x.detach()
    count = float(x.numel() // x.shape[channel_dim])
    fused = _fused_moments(x, channel_dim)
    mean, m2 = fused if fused is not None else _partial_moments(x, channel_dim)
    return Moments(count, mean, m2)


class OperatorMoments(Metric):
    """Per-channel moments of every operator's input, and the number of images seen, in float64.

    Declared once, synchronised by torchmetrics: all sites' ``(count, mean, M2)`` are packed into one state
    (``dist_reduce_fx=None``: one gather stacks every process's copy, and :meth:`compute` merges them with the
    exact Chan rule), and the image count is a ``"sum"`` state. A whole model's statistics therefore cost two
    collectives, whatever the number of operators.

    :meth:`update` counts a batch of images; during the forward pass each operator hands its input to
    :meth:`observer` of its site.
    """

    full_state_update = False
    is_differentiable = False

    def __init__(self, channels: Sequence[int], channel_dims: Sequence[int], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if len(channels) != len(channel_dims) or not channels:
            raise ValueError("OperatorMoments needs one channel count and one channel axis per site.")
        self.channels = [int(c) for c in channels]
        self.channel_dims = [int(d) for d in channel_dims]
        self.num_sites = len(self.channels)
        starts = [0]
        for c in self.channels:
            starts.append(starts[-1] + c)
        self._starts = starts  # channel offsets of each site in the packed mean / M2 blocks
        size = self.num_sites + 2 * starts[-1]  # [counts | means | M2s]
        self.add_state("moments", torch.zeros(size, dtype=torch.float64), dist_reduce_fx=None)
        self.add_state("images", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def _slices(self, site: int) -> tuple[slice, slice, slice]:
        s, total = self.num_sites, self._starts[-1]
        lo, hi = self._starts[site], self._starts[site + 1]
        return slice(site, site + 1), slice(s + lo, s + hi), slice(s + total + lo, s + total + hi)

    def _site(self, packed: Tensor, site: int) -> Moments:
        count, mean, m2 = (packed[..., part] for part in self._slices(site))
        return Moments(count.reshape(count.shape[:-1]), mean, m2)

    def update(self, images: Tensor) -> None:
        """Count one batch of images (call it once per batch, before the forward pass)."""
        self.images += images.shape[0]

    def observer(self, site: int) -> Callable[[Tensor], None]:
        """The function operator ``site`` hands its input to while the statistics are collected."""
        return functools.partial(self._observe, site)

    def _observe(self, site: int, x: Tensor) -> None:
        merged = merge_moments(self._site(self.moments, site), batch_moments(x, self.channel_dims[site]))
        count, mean, m2 = self._slices(site)
        self.moments[count] = merged.count
        self.moments[mean] = merged.mean
        self.moments[m2] = merged.m2

    def compute(self) -> tuple[list[Moments], int]:
        """Every site's moments (merged over processes after a sync) and the number of images."""
        packed = self.moments
        if packed.dim() == 1:
            packed = packed.unsqueeze(0)
        # after a distributed sync the packed states are stacked [world_size, ...]: merge process by process
        sites = []
        for site in range(self.num_sites):
            total = self._site(packed[0], site)
            for rank in range(1, packed.shape[0]):
                total = merge_moments(total, self._site(packed[rank], site))
            sites.append(total)
        return sites, int(self.images)

    def set_dtype(self, dst_type: torch.dtype) -> Metric:
        # Lightning or the user casting the model to half must never lower the accumulator's precision.
        return self
