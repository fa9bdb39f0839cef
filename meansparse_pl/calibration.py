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
from meansparse_pl.inputs import InputProblems, check_images, parameter_dtype
from meansparse_pl.io import atomic_torch_save, batch_digest, safe_load, state_digest
from meansparse_pl.modes import eval_mode
from meansparse_pl.ops import MeanSparse, require_operators
from meansparse_pl.sharding import merge_across_processes
from meansparse_pl.statistics import Moments, OperatorMoments


@dataclass(frozen=True)
class CalibrationSummary:
    """What a calibration pass did; ``images`` counts each image once, summed over processes."""

    sites: int
    images: int
    batches: int
    seconds: float
    dtype: str = "float32"  # the dtype the model ran in while the statistics were collected


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


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


@dataclass
class _DeviceGroup:
    """The operators whose buffers live on one device, and their accumulator (kept on that device)."""

    device: torch.device
    sites: list[int]
    moments: OperatorMoments


class Calibrator:
    """Attach the accumulators to every operator, observe batches, then write the (synchronised) statistics.

    Use :meth:`observing` around the batches, :meth:`observe` on each, and :meth:`finish` once at the end.

    Args:
        model: the sparsified model.
        device: where the images go (default: the device of the model's first parameter, i.e. its input layer).
            Each operator's moments stay on the operator's own device, so a model spread over several devices
            calibrates without moving activations.
        distributed: merge across processes (torchmetrics syncs the states in :meth:`finish`): ``None`` when a
            process group of several processes is initialised (each must pass its own disjoint shard), or
            ``True`` / ``False`` explicitly; ``False`` calibrates this process alone, e.g. on rank 0 only.

    The rule for precision: the statistics pass runs the model in its own parameter dtype with autocast off,
    whatever precision training or the Trainer uses (``bf16-mixed`` keeps float32 weights, so it collects
    float32 statistics, exactly like ``32-true``; ``bf16-true`` / ``16-true`` weights run in their own
    dtype); :attr:`dtype` records it, and the checkpoint's calibration summary carries it. Moments accumulate
    in float64.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        device: torch.device | str | None = None,
        distributed: bool | None = None,
    ) -> None:
        self.model = model
        self.operators: list[MeanSparse] = require_operators(model)
        # the input layer's device (a model without parameters: its first operator's)
        default = next((p.device for p in model.parameters()), self.operators[0].mean.device)
        self.device = torch.device(device) if device is not None else default
        self.dtype: torch.dtype = parameter_dtype(model)
        sync = merge_across_processes(distributed)
        by_device: dict[torch.device, list[int]] = {}
        for site, op in enumerate(self.operators):
            by_device.setdefault(op.mean.device, []).append(site)
        self.groups = [
            _DeviceGroup(
                where,
                sites,
                OperatorMoments(
                    [self.operators[i].num_channels for i in sites],
                    [self.operators[i].channel_dim for i in sites],
                    sync_on_compute=sync,
                ).to(where),
            )
            for where, sites in by_device.items()
        ]
        self.expected_shape = expected_input_shape(model)
        self.batches = 0
        self._checked_first = False
        # every batch's pixels, checked where the data is and read once by finish(): a per-batch check would be
        # a host read each batch (a device sync on a GPU)
        self.problems = InputProblems(sync_on_compute=sync).to(self.device)

    @contextlib.contextmanager
    def observing(self) -> Iterator[Calibrator]:
        """Eval mode, observers attached; restores every module's train/eval mode afterwards."""
        with eval_mode(self.model):
            for group in self.groups:
                for local, site in enumerate(group.sites):
                    self.operators[site].observer = group.moments.observer(local)
            try:
                yield self
            finally:
                for op in self.operators:
                    op.observer = None

    @torch.no_grad()
    def observe(self, batch: Any) -> None:
        """Feed one batch (a tensor, ``(images, labels)`` or a dict) through the model."""
        images = images_of(batch)
        where = f"calibration batch {self.batches}"
        if not self._checked_first:  # the first batch in full, at once (one host read)
            images = check_images(images, where=where, input_shape=self.expected_shape, dtype=self.dtype)
            self._checked_first = True
        else:
            check_input_shape(self.expected_shape, images, where)
        images = images.to(self.device, non_blocking=True)
        self.problems.update(images, batch=self.batches)
        images = images.to(self.dtype)
        for group in self.groups:
            group.moments.update(images)
        with torch.autocast(self.device.type, enabled=False):
            self.model(images)
        self.batches += 1

    def state(self) -> list[torch.Tensor]:
        """The packed moments of every device group (for resumable state files)."""
        return [group.moments.moments for group in self.groups]

    def compute(self) -> tuple[list[Moments], int]:
        """Every operator's moments (merged over processes when syncing) and the number of images."""
        with warnings.catch_warnings():
            # a process whose shard is empty never called update(); it must still take part in the sync
            warnings.filterwarnings("ignore", message=".*was called before the ``update`` method.*")
            sites: list[Moments | None] = [None] * len(self.operators)
            images = 0
            for group in self.groups:
                moments, images = group.moments.compute()
                for site, value in zip(group.sites, moments, strict=True):
                    sites[site] = value
        return sites, images  # type: ignore[return-value]

    def finish(self) -> int:
        """Write mean / var / count into every operator; returns the number of images seen (all processes)."""
        with warnings.catch_warnings():  # a process without a batch still takes part in the merge
            warnings.filterwarnings("ignore", message=".*was called before the ``update`` method.*")
            self.problems.verify("calibration")  # one host read, at the end
        self.problems.reset()
        sites, images = self.compute()
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
        for group in self.groups:
            group.moments.reset()
        return images


def calibrate(
    model: nn.Module,
    dataloader: Iterable,
    *,
    limit_batches: int | None = None,
    device: torch.device | str | None = None,
    progress: bool = True,
    distributed: bool | None = None,
) -> CalibrationSummary:
    """Fill every MeanSparse operator's per-channel mean and variance from one pass over ``dataloader``.

    The model runs in eval mode without gradients; nothing but the operators' buffers changes (BatchNorm
    running statistics included) and every module's train/eval mode is restored. The statistics are the
    population mean and variance over every element seen, accumulated in float64, so they do not depend on
    batch size, batch order or, under torch.distributed, on how the data is sharded across processes
    (each process must see a disjoint shard; the results are merged exactly). ``distributed`` says whether
    to merge (see :class:`Calibrator`: by default when a process group of several processes is initialised;
    ``False`` calibrates on this process alone, e.g. on rank 0 after a DDP fit). ``device`` is where the images
    go (default: the model's first parameter's device); the precision rule is :class:`Calibrator`'s.
    """
    limit_batches = check_optional_positive_int("limit_batches", limit_batches, "or None for every batch")
    start = time.perf_counter()
    calibrator = Calibrator(model, device=device, distributed=distributed)
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
        len(calibrator.operators),
        images,
        calibrator.batches,
        time.perf_counter() - start,
        dtype_name(calibrator.dtype),
    )


class CalibrationModule(pl.LightningModule):
    """The :class:`Calibrator` inside Lightning's predict loop (``cli.py postprocess``): the Trainer provides
    devices and the progress bar; give it a loader of whole batches per process
    (:func:`meansparse_pl.sharding.whole_batches_of`); the statistics are merged at the end. Under a mixed-precision Trainer the pass
    runs with autocast off (the :class:`Calibrator`'s precision rule), so ``postprocess`` and the
    ``MeanSparseCallback`` collect the same statistics.

    With ``state_path``, a stop requested by SIGTERM / SIGUSR1 saves the moments gathered so far (one file per
    process) and raises :class:`~meansparse_pl.errors.Interrupted`; the same run started again skips the
    batches already seen and continues from those moments, so the statistics are exactly those of an
    uninterrupted pass. A state written for another model is ignored (it is only a head start); each batch's
    content digest is saved with it, so a resumed pass over other data or in another order (another
    ``data.seed``) starts over instead of mixing two passes.
    """

    def __init__(self, model: nn.Module, state_path: str | os.PathLike | None = None) -> None:
        super().__init__()
        self.model = model
        self.state_path = state_path
        self.images = 0
        self.statistics_dtype = ""  # the dtype the model ran in while collecting (see Calibrator)
        self.calibrator: Calibrator | None = None
        self._skip = 0
        self._observing = contextlib.ExitStack()
        self._finished = False
        self._digests: list[str] = []  # content digest of each batch this pass read, in order
        self._saved_digests: list[str] = []  # those of the batches a resumed state had seen
        # fewer batches than processes: a process without a batch still merges (see finish_without_batches)
        self.allow_zero_length_dataloader_with_multiple_devices = True

    def _state_file(self) -> Path | None:
        return None if self.state_path is None else Path(f"{self.state_path}.rank{self.global_rank}")

    def _fingerprint(self) -> str:
        digest = state_digest(self.model.state_dict())
        digest.update(f"{self.trainer.num_predict_batches} {self.trainer.world_size}".encode())
        return digest.hexdigest()[:16]

    def on_predict_start(self) -> None:
        self.calibrator = Calibrator(self.model, distributed=self.trainer.world_size > 1)
        self._skip = 0
        self._finished = False
        self._digests = []
        self._saved_digests = []
        path = self._state_file()
        if path is not None and path.is_file():
            saved = self._saved_state(path)
            if saved is not None:
                for group, moments in zip(self.calibrator.groups, saved["moments"], strict=True):
                    group.moments.moments.copy_(moments)
                    group.moments.images.fill_(float(saved["images"]))
                self.calibrator.batches = self._skip = int(saved["batches"])
                self._saved_digests = list(saved["batch_digests"])
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
        own = self.calibrator.state()
        fits = (
            saved.get("fingerprint") == self._fingerprint()
            and isinstance(moments, list)
            and len(moments) == len(own)
            and all(
                isinstance(m, torch.Tensor) and m.shape == o.shape for m, o in zip(moments, own, strict=False)
            )
            and isinstance(images, float)
            and isinstance(batches, int)
            and 0 <= batches <= self.trainer.num_predict_batches[0]
            and isinstance(saved.get("batch_digests"), list)
            and len(saved["batch_digests"]) == batches
        )
        return saved if fits else None

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        # a resumable pass identifies each batch's content here, while it is still on the host, so that a resumed
        # pass can tell that it reads the same data in the same order
        if self.state_path is not None:
            self._digests.append(batch_digest(images_of(batch)))
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    def _same_data_as_saved(self, batch_idx: int) -> bool:
        """Whether the batch skipped on resume is the one the saved moments saw. The first batch differing
        starts the pass over (other data or another order, e.g. another data.seed); a later one cannot be
        undone from the merged moments, so it is an error."""
        if batch_idx >= len(self._digests) or self._digests[batch_idx] == self._saved_digests[batch_idx]:
            return True
        if batch_idx > 0:
            raise ConfigurationError(
                f"the statistics state {self._state_file()} was saved by a pass whose batch {batch_idx} held other "
                "images than this one (the data changed while it was interrupted); delete it to start afresh."
            )
        rank_zero_info(
            f"MeanSparse statistics: {self._state_file()} was saved by a pass over other data or another order "
            "(data.seed?); starting over"
        )
        assert self.calibrator is not None
        self._observing.close()
        self.calibrator = Calibrator(self.model, distributed=self.trainer.world_size > 1)
        self._observing.enter_context(self.calibrator.observing())
        self._skip = 0
        return False

    def predict_step(self, batch: Any, batch_idx: int) -> None:
        assert self.calibrator is not None
        if batch_idx < self._skip and self._same_data_as_saved(batch_idx):
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
        self.calibrator.problems.verify("calibration")  # a resumed pass does not see these batches again
        atomic_torch_save(
            {
                "fingerprint": self._fingerprint(),
                "moments": [m.detach().cpu() for m in self.calibrator.state()],
                "images": float(self.calibrator.groups[0].moments.images),
                "batches": self.calibrator.batches,
                "batch_digests": self._digests[: self.calibrator.batches],
            },
            path,
        )
        return (
            f"the statistics pass stopped on {signal_name} after {self.calibrator.batches} batches, saved in {path}; "
            "run the same command again to resume"
        )

    def finish_without_batches(self, trainer: pl.Trainer) -> None:
        """Call after ``trainer.predict``: a process that had no batch (Lightning then skips every hook) still
        enters the merge the others entered at the end of their pass."""
        if not self._finished:
            self.calibrator = Calibrator(self.model, distributed=trainer.world_size > 1)
            self._finish()

    def on_predict_end(self) -> None:
        self._observing.close()
        self._finish()

    def _finish(self) -> None:
        assert self.calibrator is not None
        self._finished = True
        self.images = self.calibrator.finish()
        self.statistics_dtype = dtype_name(self.calibrator.dtype)
        path = self._state_file()
        if path is not None:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()


def check_data_fits(model: nn.Module, dataset: Any, datamodule: Any, checkpoint: str | os.PathLike) -> None:
    """One error naming both shapes when the data's images are not of the shape the operators were placed for
    (a 1-channel checkpoint and CIFAR data, say), instead of a convolution's traceback."""
    if len(dataset) == 0:
        return
    image = dataset[0][0]
    where = f"the data module {type(datamodule).__name__} and the checkpoint {checkpoint} do not fit"
    check_input_shape(expected_input_shape(model), image[None], where)
