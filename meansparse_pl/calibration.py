"""One pass over the training split that fills every operator's channel statistics.

Observing and applying are separate steps over the same inserted modules (as torch.ao's observers and
convert): while calibrating, each operator hands its input to an :class:`OperatorMoments` accumulator and
passes it through unchanged, so every site sees the features of the unmodified model.

:class:`Calibrator` is the one driver: :func:`calibrate` (Python API), the
:class:`~meansparse_pl.callback.MeanSparseCallback` (at fit end) and ``cli.py postprocess`` (through
Lightning's predict loop, :class:`CalibrationModule`) all feed their batches to it, so every path makes the
same checks: images found in the batch, finite pixels, the shape the placement was made for.
"""

from __future__ import annotations

import contextlib
import itertools
import time
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn
from tqdm.auto import tqdm

from meansparse_pl.config import check_optional_positive_int
from meansparse_pl.errors import ConfigurationError, DataNotFoundError, StatisticsError
from meansparse_pl.modes import eval_mode
from meansparse_pl.ops import MeanSparse, require_operators
from meansparse_pl.statistics import OperatorMoments


@dataclass(frozen=True)
class CalibrationSummary:
    """What a calibration pass did; ``images`` counts each image once, summed over processes."""

    sites: int
    images: int
    batches: int
    seconds: float


def images_of(batch: Any) -> torch.Tensor:
    """The images of a batch: a tensor, the first element of ``(images, labels, ...)``, or ``batch["image"]``
    / ``batch["input"]``."""
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, list | tuple) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0]
    if isinstance(batch, dict) and isinstance(batch.get("image", batch.get("input")), torch.Tensor):
        return batch.get("image", batch.get("input"))
    raise ConfigurationError(
        f"cannot find the images in a batch of type {type(batch).__name__}; yield tensors or (images, labels)."
    )


def expected_input_shape(model: nn.Module) -> tuple[int, ...] | None:
    """The input shape (without the batch dim) the model's placement was made for, if it records one."""
    placement = getattr(model, "meansparse_placement", None)
    return None if placement is None else tuple(placement.input_shape)


def check_input_shape(expected: tuple[int, ...] | None, images: torch.Tensor, where: str) -> None:
    """One error naming both shapes when ``images`` do not have the shape the placement was made for."""
    if expected is not None and tuple(images.shape[1:]) != expected:
        raise ConfigurationError(
            f"{where}: the images have shape {tuple(images.shape[1:])} but the model's operators were placed for "
            f"{expected} (channels, height, width); use data of that shape, or sparsify the model again for this one."
        )


class Calibrator:
    """Attach the accumulators to every operator, observe batches, then write the (synchronised) statistics.

    Use :meth:`observing` around the batches, :meth:`observe` on each, and :meth:`finish` once at the end;
    ``finish`` merges across processes when torch.distributed is initialised (torchmetrics syncs the states).
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.operators: list[MeanSparse] = require_operators(model)
        self.device = self.operators[0].mean.device
        self.moments = OperatorMoments(
            [op.num_channels for op in self.operators], [op.channel_dim for op in self.operators]
        ).to(self.device)
        self.expected_shape = expected_input_shape(model)
        self.batches = 0

    @contextlib.contextmanager
    def observing(self) -> Iterator[Calibrator]:
        """Eval mode, observers attached; restores every module's train/eval mode afterwards."""
        with eval_mode(self.model):
            for site, op in enumerate(self.operators):
                op.observer = self.moments.observer(site)
            try:
                yield self
            finally:
                for op in self.operators:
                    op.observer = None

    @torch.no_grad()
    def observe(self, batch: Any) -> None:
        """Feed one batch (a tensor, ``(images, labels)`` or a dict) through the model."""
        images = images_of(batch).to(self.device, non_blocking=True)
        where = f"calibration batch {self.batches}"
        check_input_shape(self.expected_shape, images, where)
        if not torch.isfinite(images).all():
            raise StatisticsError(f"{where} contains NaN or Inf pixels; clean the data before calibrating.")
        self.moments.update(images)
        self.model(images)
        self.batches += 1

    def finish(self) -> int:
        """Write mean / var / count into every operator; returns the number of images seen (all processes)."""
        with warnings.catch_warnings():
            # a process whose shard is empty never called update(); it must still take part in the sync
            warnings.filterwarnings("ignore", message=".*was called before the ``update`` method.*")
            sites, images = self.moments.compute()
        if images == 0:
            raise DataNotFoundError(
                "the calibration data yielded no images; check the training split and limits."
            )
        for op, moments in zip(self.operators, sites, strict=True):
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
        self.moments.reset()
        return images


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
    limit_batches = check_optional_positive_int("limit_batches", limit_batches, "or None for every batch")
    start = time.perf_counter()
    calibrator = Calibrator(model)
    if device is not None:
        calibrator.device = torch.device(device)
    total = limit_batches
    if total is None and hasattr(dataloader, "__len__"):
        total = len(dataloader)  # type: ignore[arg-type]
    elif total is not None and hasattr(dataloader, "__len__"):
        total = min(total, len(dataloader))  # type: ignore[arg-type]
    with calibrator.observing():
        # islice, not a break inside the loop: no batch beyond the limit is drawn (and loaded) from the loader
        batches = itertools.islice(dataloader, limit_batches)
        for batch in tqdm(
            batches, total=total, desc="MeanSparse statistics", unit="batch", disable=not progress
        ):
            calibrator.observe(batch)
    images = calibrator.finish()
    return CalibrationSummary(
        len(calibrator.operators), images, calibrator.batches, time.perf_counter() - start
    )


class CalibrationModule(pl.LightningModule):
    """The :class:`Calibrator` inside Lightning's predict loop (``cli.py postprocess``): the Trainer provides
    devices, sharding without padding, and the progress bar; the statistics are merged at the end."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.images = 0
        self.calibrator: Calibrator | None = None
        self._observing = contextlib.ExitStack()

    def on_predict_start(self) -> None:
        self.calibrator = Calibrator(self.model)
        self._observing.enter_context(self.calibrator.observing())

    def predict_step(self, batch: Any, batch_idx: int) -> None:
        assert self.calibrator is not None
        self.calibrator.observe(batch)

    def on_predict_end(self) -> None:
        self._observing.close()
        assert self.calibrator is not None
        self.images = self.calibrator.finish()
