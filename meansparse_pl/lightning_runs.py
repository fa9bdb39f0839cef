"""Lightning's own runs made safe: checkpoints that are whole or absent, and stops that say so.

:class:`AtomicCheckpointIO` writes each ``.ckpt`` into a
temporary file beside its final name (the same file system), fsyncs it and renames it over, so SIGKILL or a
full disk never leaves a truncated ``last.ckpt`` / ``best-*.ckpt`` under its final name (Lightning's own writer
goes through fsspec, whose local transaction writes the temporary file in ``$TMPDIR`` and moves it: a copy,
not a rename, across file systems). Loading a damaged one is one clear error naming the file.

:func:`stopped_as_interrupted` (around ``fit`` / ``validate`` / ``test`` of :class:`LightningSubcommands`,
the base of :class:`~meansparse_pl.trainer.MeanSparseTrainer`) installs it when the strategy uses Lightning's default
checkpoint writer (with another Trainer pass ``plugins=[AtomicCheckpointIO()]``), and turns Lightning's exit on
SIGTERM (status 0) or Ctrl-C (status 1) into an :class:`~meansparse_pl.errors.Interrupted` stop: the CLI's
``stopped:`` line, naming the checkpoint to resume from, and exit status ``128 + signal``.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import signal
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch import nn

from meansparse_pl.checkpoint import load_checkpoint
from meansparse_pl.errors import CheckpointError, Interrupted
from meansparse_pl.io import atomic_torch_save, safe_load
from meansparse_pl.ops import operators


def log_rows(loggers: list[Any], rows: list[dict[str, float]], first_step: int = 0) -> None:
    """A result's numbers in the user's Lightning loggers (CSV, TensorBoard, W&B, ...), one row per step from
    ``first_step``: the one logger adapter of every subcommand and callback."""
    for logger in loggers:
        for offset, row in enumerate(rows):
            logger.log_metrics(row, step=first_step + offset)
        logger.save()


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` with a same-directory atomic write for local paths and one-line load errors."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None or "://" in str(path):  # remote storage: Lightning's own writer
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        atomic_torch_save(checkpoint, path)

    def load_checkpoint(
        self,
        path: str | os.PathLike,
        map_location: Callable | Any = lambda storage, loc: storage,
        weights_only: bool | None = None,
    ) -> dict[str, Any]:
        if not get_filesystem(path).exists(path):
            raise CheckpointError(f"no Lightning checkpoint at {path}; check --ckpt_path.")
        try:
            return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)
        except (EOFError, RuntimeError, zipfile.BadZipFile, pickle.UnpicklingError, ValueError) as error:
            raise CheckpointError(_damaged(path, error)) from error


def _damaged(path: str | os.PathLike, error: BaseException) -> str:
    detail = str(error).splitlines()[0][:120] if str(error) else "no detail"
    return (
        f"{path} is truncated or not a Lightning checkpoint ({type(error).__name__}: {detail}); resume from "
        "another checkpoint (last.ckpt or an earlier epoch's) or start the run afresh."
    )


@contextlib.contextmanager
def stopped_as_interrupted(trainer: pl.Trainer, what: str) -> Iterator[None]:
    """Around Lightning's ``fit`` / ``validate`` / ``test`` (see the module docstring)."""
    if (
        type(trainer.strategy.checkpoint_io) is TorchCheckpointIO
    ):  # Lightning's default writer, not the user's
        trainer.strategy.checkpoint_io = AtomicCheckpointIO()
    try:
        yield
    except SIGTERMException:
        raise Interrupted(
            f"{what} stopped on SIGTERM; {_resume_hint(trainer, what)}", signal.SIGTERM
        ) from None
    except SystemExit as stop:
        if isinstance(stop.__context__, KeyboardInterrupt):
            raise Interrupted(
                f"{what} stopped on SIGINT; {_resume_hint(trainer, what)}", signal.SIGINT
            ) from None
        raise


def _resume_hint(trainer: pl.Trainer, what: str) -> str:
    if what != "fit":
        return "nothing was written; run it again"
    callback = trainer.checkpoint_callback
    newest = getattr(callback, "last_model_path", "") or getattr(callback, "best_model_path", "")
    if newest and Path(newest).is_file():
        return f"no MeanSparse checkpoint was written; resume training with --ckpt_path {newest}"
    return "no checkpoint was written yet; run fit again"


def check_lightning_checkpoint(path: str | os.PathLike) -> None:
    """A ``--ckpt_path`` that LightningCLI will read for its hyper-parameters (before any of our code runs) must
    load: a truncated or foreign file is one :class:`CheckpointError` instead of torch's traceback."""
    if not Path(path).is_file():
        return  # Lightning's own names ("last", "best") and remote paths are Lightning's to resolve
    try:
        torch.load(path, weights_only=True, map_location="cpu")
    except (EOFError, RuntimeError, zipfile.BadZipFile, pickle.UnpicklingError, ValueError) as error:
        raise CheckpointError(_damaged(path, error)) from error


class LightningSubcommands(pl.Trainer):
    """Lightning's own ``fit``, ``validate`` and ``test`` as the CLI runs them: atomic checkpoints, a SIGTERM or
    Ctrl-C ending as an :class:`~meansparse_pl.errors.Interrupted` stop (the CLI's ``stopped:`` line naming the
    checkpoint to resume from, exit status ``128 + signal``) instead of Lightning's exit with status 0 or 1,
    ``--network`` as in every MeanSparse subcommand, and ``validate`` / ``test`` of a MeanSparse checkpoint (one
    written by ``postprocess`` or the ``MeanSparseCallback``) as well as of a Lightning one."""

    def fit(
        self,
        model: pl.LightningModule,
        train_dataloaders: Any = None,
        val_dataloaders: Any = None,
        datamodule: pl.LightningDataModule | None = None,
        ckpt_path: str | None = None,
        weights_only: bool | None = None,
        network: nn.Module | None = None,
    ) -> None:
        """Lightning's ``fit`` (adversarial training; the callbacks sparsify and search alpha at its end).

        Args:
            ckpt_path: Lightning checkpoint to resume from ("last" for the newest of this run).
            weights_only: Passed to Lightning's checkpoint loading.
            network: Any nn.Module (class_path + init_args) to train instead of the model section's backbone.
        """
        with stopped_as_interrupted(self, "fit"):
            super().fit(
                self.with_network(model, network),
                train_dataloaders,
                val_dataloaders,
                datamodule,
                ckpt_path,
                weights_only,
            )

    def validate(  # type: ignore[override]
        self,
        model: pl.LightningModule | None = None,
        dataloaders: Any = None,
        ckpt_path: str | None = None,
        verbose: bool = True,
        datamodule: pl.LightningDataModule | None = None,
        network: nn.Module | None = None,
    ) -> Any:
        """Lightning's ``validate`` (clean and PGD accuracy on the held-out split).

        Args:
            ckpt_path: Lightning checkpoint, or MeanSparse checkpoint, to take the weights from.
            verbose: Print the results.
            network: Any nn.Module (class_path + init_args) to use instead of the model section's backbone.
        """
        return self._evaluation_stage("validate", model, dataloaders, ckpt_path, verbose, datamodule, network)

    def test(  # type: ignore[override]
        self,
        model: pl.LightningModule | None = None,
        dataloaders: Any = None,
        ckpt_path: str | None = None,
        verbose: bool = True,
        datamodule: pl.LightningDataModule | None = None,
        network: nn.Module | None = None,
    ) -> Any:
        """Lightning's ``test`` (clean and PGD accuracy on the test split).

        Args:
            ckpt_path: Lightning checkpoint, or MeanSparse checkpoint, to take the weights from.
            verbose: Print the results.
            network: Any nn.Module (class_path + init_args) to use instead of the model section's backbone.
        """
        return self._evaluation_stage("test", model, dataloaders, ckpt_path, verbose, datamodule, network)

    def _evaluation_stage(
        self,
        stage: str,
        model: Any,
        dataloaders: Any,
        ckpt_path: str | None,
        verbose: bool,
        datamodule: pl.LightningDataModule | None,
        network: nn.Module | None,
    ) -> Any:
        """Lightning's ``validate`` or ``test`` with the network, a MeanSparse checkpoint and the clean stop."""
        model, ckpt_path = self._weights_from(self.with_network(model, network), ckpt_path, network)
        with stopped_as_interrupted(self, stage):
            return getattr(super(), stage)(model, dataloaders, ckpt_path, verbose, datamodule)

    @staticmethod
    def with_network(model: Any, network: nn.Module | None) -> Any:
        """The module with ``network`` put where the CLI's model keeps its network (``model``)."""
        if network is not None and model is not None:
            model.model = network
        return model

    @staticmethod
    def _weights_from(model: Any, ckpt_path: str | None, network: nn.Module | None) -> tuple[Any, str | None]:
        """A MeanSparse checkpoint (not a Lightning one) is loaded into the module's network here, operators
        and statistics included, and Lightning is given no checkpoint path."""
        if ckpt_path is None or model is None or not Path(ckpt_path).is_file():
            return model, ckpt_path
        payload = safe_load(ckpt_path)
        if "meansparse" not in payload or "pytorch-lightning_version" in payload:
            return model, ckpt_path
        fallback = getattr(model, "model", None) if network is None else None
        model.model = load_checkpoint(ckpt_path, network, fallback_model=fallback)
        rank_zero_info(f"MeanSparse checkpoint {ckpt_path}: {len(operators(model.model))} operators loaded")
        return model, None
