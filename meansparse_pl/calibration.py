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
import os
import time
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from tqdm.auto import tqdm

from meansparse_pl import preemption
from meansparse_pl.config import check_optional_positive_int
from meansparse_pl.errors import CheckpointError, ConfigurationError, DataNotFoundError, StatisticsError
from meansparse_pl.io import atomic_torch_save, safe_load, state_digest
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
    devices, sharding without padding, and the progress bar; the statistics are merged at the end.

    With ``state_path``, a stop requested by SIGTERM / SIGUSR1 saves the moments gathered so far (one file per
    process) and raises :class:`~meansparse_pl.errors.Interrupted`; the same run started again skips the
    batches already seen and continues from those moments, so the statistics are exactly those of an
    uninterrupted pass. A state written for another model or data is ignored (it is only a head start).
    """

    def __init__(self, model: nn.Module, state_path: str | os.PathLike | None = None) -> None:
        super().__init__()
        self.model = model
        self.state_path = state_path
        self.images = 0
        self.calibrator: Calibrator | None = None
        self._skip = 0
        self._observing = contextlib.ExitStack()

    def _state_file(self) -> Path | None:
        return None if self.state_path is None else Path(f"{self.state_path}.rank{self.global_rank}")

    def _fingerprint(self) -> str:
        digest = state_digest(self.model.state_dict())
        digest.update(f"{self.trainer.num_predict_batches} {self.trainer.world_size}".encode())
        return digest.hexdigest()[:16]

    def on_predict_start(self) -> None:
        self.calibrator = Calibrator(self.model)
        self._skip = 0
        path = self._state_file()
        if path is not None and path.is_file():
            saved = self._saved_state(path)
            if saved is not None:
                self.calibrator.moments.moments.copy_(saved["moments"])
                self.calibrator.moments.images.fill_(float(saved["images"]))
                self.calibrator.batches = self._skip = int(saved["batches"])
                rank_zero_info(f"MeanSparse statistics: resuming after {self._skip} batches ({path})")
            else:
                rank_zero_info(
                    f"MeanSparse statistics: {path} belongs to another run or is unreadable; starting over"
                )
        self._observing.enter_context(self.calibrator.observing())

    def _saved_state(self, path: Path) -> dict[str, Any] | None:
        """The saved progress, if it is this run's and well formed."""
        assert self.calibrator is not None
        try:
            saved = safe_load(path)
        except CheckpointError:
            return None
        moments, images, batches = saved.get("moments"), saved.get("images"), saved.get("batches")
        fits = (
            saved.get("fingerprint") == self._fingerprint()
            and isinstance(moments, torch.Tensor)
            and moments.shape == self.calibrator.moments.moments.shape
            and isinstance(images, float)
            and isinstance(batches, int)
            and 0 <= batches <= self.trainer.num_predict_batches[0]
        )
        return saved if fits else None

    def predict_step(self, batch: Any, batch_idx: int) -> None:
        assert self.calibrator is not None
        if batch_idx < self._skip:
            return
        try:
            self.calibrator.observe(batch)
            preemption.stop_if_requested(self._save_and_explain)
        except BaseException:
            self._observing.close()  # a refused batch or a stop: the operators are left as they were
            raise

    def _save_and_explain(self, signal_name: str) -> str:
        assert self.calibrator is not None
        path = self._state_file()
        if path is None:
            return f"the statistics pass stopped on {signal_name}; nothing was kept, run it again"
        moments = self.calibrator.moments
        atomic_torch_save(
            {
                "fingerprint": self._fingerprint(),
                "moments": moments.moments.detach().cpu(),
                "images": float(moments.images),
                "batches": self.calibrator.batches,
            },
            path,
        )
        return (
            f"the statistics pass stopped on {signal_name} after {self.calibrator.batches} batches, saved in {path}; "
            "run the same command again to resume"
        )

    def on_predict_end(self) -> None:
        self._observing.close()
        assert self.calibrator is not None
        self.images = self.calibrator.finish()
        path = self._state_file()
        if path is not None:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
