"""One pass over the training split that fills every operator's channel statistics.

Observing and applying are separate steps over the same inserted modules (as torch.ao's observers and
convert): while calibrating, each operator hands its input to a :class:`ChannelMoments` accumulator and
passes it through unchanged, so every site sees the features of the unmodified model.
"""

from __future__ import annotations

import contextlib
import itertools
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from meansparse_pl.errors import ConfigurationError, DataNotFoundError, StatisticsError
from meansparse_pl.operator import MeanSparse, _require_operators
from meansparse_pl.statistics import ChannelMoments


@dataclass(frozen=True)
class CalibrationSummary:
    """What a calibration pass did; ``images`` counts each image once, summed over processes."""

    sites: int
    images: int
    batches: int
    seconds: float


def _inputs_of(batch) -> torch.Tensor:
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0]
    if isinstance(batch, dict) and isinstance(batch.get("image", batch.get("input")), torch.Tensor):
        return batch.get("image", batch.get("input"))
    raise ConfigurationError(
        f"cannot find the images in a batch of type {type(batch).__name__}; yield tensors or (images, labels)."
    )


class StatisticsCollector:
    """Attach accumulators to every operator, feed batches, then write the (synchronised) statistics.

    The Lightning callback and ``cli.py postprocess`` drive the same object from their own loops, so the
    statistics logic lives here once. ``finish`` all-gathers across processes when torch.distributed is
    initialised (torchmetrics does the gathering).
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.operators: list[MeanSparse] = _require_operators(model)
        device = self.operators[0].mean.device
        self.moments = [ChannelMoments(op.num_channels, op.channel_dim).to(device) for op in self.operators]
        self.images = torch.zeros((), dtype=torch.float64, device=device)
        self.batches = 0

    @contextlib.contextmanager
    def observing(self) -> Iterator[StatisticsCollector]:
        """Eval mode, observers attached; restores every module's train/eval mode afterwards."""
        modes = [(m, m.training) for m in self.model.modules()]
        self.model.eval()
        for op, moments in zip(self.operators, self.moments, strict=True):
            op._observer = moments.update
        try:
            yield self
        finally:
            for op in self.operators:
                op._observer = None
            for m, mode in modes:
                m.training = mode

    @torch.no_grad()
    def observe(self, images: torch.Tensor) -> None:
        self.model(images)
        self.images += images.shape[0]
        self.batches += 1

    def finish(self) -> int:
        """Write mean / var / count into every operator; returns the number of images seen (all processes)."""
        images = self.images.clone()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(images)
        if int(images) == 0:
            raise DataNotFoundError(
                "the calibration data yielded no images; check the training split and limits."
            )
        for op, accumulator in zip(self.operators, self.moments, strict=True):
            moments = accumulator.compute()
            if float(moments.count) == 0:
                raise StatisticsError(
                    f"{op.site_name}: the site never ran during calibration (a branch the data did not take?); "
                    "exclude it with exclude=[...] / sites=[...] or calibrate on data that reaches it."
                )
            if not (torch.isfinite(moments.mean).all() and torch.isfinite(moments.m2).all()):
                raise StatisticsError(
                    f"{op.site_name}: NaN or Inf in the channel statistics (bad input data or a diverged "
                    "model); check the data and the model's outputs before calibrating."
                )
            op.set_statistics(moments.mean, moments.var, float(moments.count))
            accumulator.reset()
        return int(images)


def calibrate(
    model: nn.Module,
    dataloader: Iterable,
    *,
    limit_batches: int | None = None,
    device: torch.device | str | None = None,
    progress: bool = True,
) -> CalibrationSummary:
    """Fill every MeanSparse operator's per-channel mean and variance from one pass over ``dataloader``.

    The model runs in eval mode without gradients; nothing but the operators' buffers changes (BatchNorm
    running statistics included) and every module's train/eval mode is restored. The statistics are the
    population mean and variance over every element seen, accumulated in float64, so they do not depend on
    batch size, batch order or, under torch.distributed, on how the data is sharded across processes
    (each process must see a disjoint shard; the results are merged exactly).
    """
    if limit_batches is not None and limit_batches < 1:
        raise ConfigurationError(f"limit_batches must be >= 1 or None, got {limit_batches}.")
    start = time.perf_counter()
    collector = StatisticsCollector(model)
    if device is None:
        device = collector.operators[0].mean.device
    total = limit_batches
    if total is None and hasattr(dataloader, "__len__"):
        total = len(dataloader)
    with collector.observing():
        # islice, not a break inside the loop: no batch beyond the limit is drawn (and loaded) from the loader
        batches = itertools.islice(dataloader, limit_batches)
        bar = tqdm(batches, total=total, desc="MeanSparse statistics", unit="batch", disable=not progress)
        for i, batch in enumerate(bar):
            images = _inputs_of(batch).to(device, non_blocking=True)
            if not torch.isfinite(images).all():
                raise StatisticsError(
                    f"calibration batch {i} contains NaN or Inf pixels; clean the data before calibrating."
                )
            collector.observe(images)
    images = collector.finish()
    return CalibrationSummary(
        len(collector.operators), images, collector.batches, time.perf_counter() - start
    )
