"""MeanSparseCallback: turn the trained model into a MeanSparse model when ``fit`` ends; AlphaSearchCallback:
then choose its alpha on the held-out split.

Like Lightning's ``ModelPruning``, it is configured only by constructor arguments (validated there, so
LightningCLI reports a bad value before training starts) and hooks one fit boundary. ``on_fit_end`` is four
public steps, each usable without a Trainer and each overridable: :meth:`~MeanSparseCallback.load_best_checkpoint`
(the paper keeps the epoch with the best PGD validation accuracy), :meth:`~MeanSparseCallback.sparsify`,
:meth:`~MeanSparseCallback.calibrate` (one pass over the training split) and :meth:`~MeanSparseCallback.save`.

Under DDP each process reads whole batches of the one-process order of the training split, none padded or
repeated (Lightning's training sampler would pad the last batch with repeated samples, which must not enter
the statistics; see :mod:`meansparse_pl.sharding`); the per-process moments are merged exactly, so the result
equals a single-process pass. The alpha search likewise runs on every process, each on whole batches of the
held-out split, with one merged result. Rank 0 writes the files while the others wait at a barrier.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
from jsonargparse import lazy_instance
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from torch.utils.data import DataLoader

from meansparse_pl.alpha_search import (
    PAPER_ALPHAS,
    SEARCH_ATTACKS,
    AlphaSearch,
    AlphaSearchResult,
    Criterion,
    Exhaustive,
    Schedule,
    Selection,
)
from meansparse_pl.calibration import CalibrationSummary, calibrate, images_of
from meansparse_pl.checkpoint import keep_operator_state_on_load, save_checkpoint
from meansparse_pl.config import (
    AttackConfig,
    PlacementConfig,
    ThreatModel,
    check_alpha,
    check_optional_positive_int,
    deprecated,
)
from meansparse_pl.data import split_samples
from meansparse_pl.errors import ConfigurationError
from meansparse_pl.evaluation import single_device_trainer
from meansparse_pl.io import safe_load
from meansparse_pl.lightning_runs import log_rows
from meansparse_pl.ops import operators, set_alpha
from meansparse_pl.placement import describe, get_preset
from meansparse_pl.placement import sparsify as place_operators
from meansparse_pl.sharding import whole_batches_of


class MeanSparseCallback(pl.Callback):
    """Insert MeanSparse operators and collect their statistics at the end of ``fit``.

    Args:
        placement: where the operators go (:class:`~meansparse_pl.config.PlacementConfig`: include, exclude,
            sites, centre, preset, channel_dims, fuse_activations, strategy, leaf_modules); default: before
            every activation, as in the paper.
        alpha: alpha stored in the saved model (0 keeps it identical to the base model; choose alpha with
            ``cli.py alpha_search`` or the ``AlphaSearchCallback`` afterwards); None keeps the operators' own
            alphas (a model fine-tuned with its operators, see ``AdversarialClassifier(init_checkpoint=...)``).
        use_best_checkpoint: load the ``ModelCheckpoint`` callback's best weights before sparsifying.
        limit_samples: collect the statistics over the first N images of the split (None: all of them), as every
            subcommand counts samples.
        limit_batches: old per-process batch limit (accepted until meansparse_pl 0.3, with a ``deprecated:``
            line; use ``limit_samples``).
        batch_size: calibration batch size (None: the datamodule's).
        output_path: where to write the sparsified checkpoint (default: ``<trainer.default_root_dir>/meansparse.pt``).
        attribute: where the LightningModule keeps the network (a dotted attribute path: ``"model"``, ``"net"``,
            ``"backbone.classifier"``); the sparsified network is put back there.
        data: what the statistics are collected on: ``"calibration"`` (the datamodule's
            ``calibration_dataloader()``: the training split without augmentation), ``"train"`` (its
            ``train_dataloader()``, as it is: augmented if it augments) or a DataLoader.

    The network and the data are looked up in :meth:`setup`, before the first training step, so a module or
    datamodule that does not provide them is one clear error instead of one after all of training.
    """

    def __init__(
        self,
        placement: PlacementConfig | None = None,
        alpha: float | None = 0.0,
        use_best_checkpoint: bool = True,
        limit_samples: int | None = None,
        batch_size: int | None = None,
        output_path: str | None = None,
        attribute: str = "model",
        data: Literal["calibration", "train"] | DataLoader = "calibration",
        limit_batches: int | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(attribute, str) or not all(part.isidentifier() for part in attribute.split(".")):
            raise ConfigurationError(
                f"attribute must be the dotted attribute path of the network in the LightningModule, e.g. 'model' "
                f"or 'net', got {attribute!r}."
            )
        if not (isinstance(data, DataLoader) or data in ("calibration", "train")):
            raise ConfigurationError(f"data must be 'calibration', 'train' or a DataLoader, got {data!r}.")
        self.attribute = attribute
        self.data = data
        self.placement = placement if placement is not None else PlacementConfig()
        if not isinstance(self.placement, PlacementConfig):
            raise ConfigurationError(f"placement must be a PlacementConfig, got {type(placement).__name__}.")
        if self.placement.strategy != "published":
            get_preset(self.placement.preset)  # an unknown preset fails before training, not after it
        self.alpha = None if alpha is None else check_alpha(alpha)
        self.use_best_checkpoint = bool(use_best_checkpoint)
        self.limit_samples = check_optional_positive_int("limit_samples", limit_samples, "or null for all")
        if limit_batches is not None:
            deprecated(
                "MeanSparseCallback(limit_batches=...) counts batches per process; it is now limit_samples"
            )
        self.limit_batches = check_optional_positive_int("limit_batches", limit_batches, "or null for all")
        self.batch_size = check_optional_positive_int(
            "batch_size", batch_size, "or null for the datamodule's"
        )
        self.output_path = output_path
        self.saved_path: Path | None = None
        self.summary: dict[str, Any] = {}

    # ------------------------------------------------------------------------------------------ the hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Before training: the network is where :attr:`attribute` says and the data can be found."""
        if stage == "fit":
            self.network_of(pl_module)
            self.source_loader(trainer)

    def network_of(self, pl_module: pl.LightningModule) -> nn.Module:
        """The network at :attr:`attribute` of ``pl_module``."""
        network: Any = pl_module
        for part in self.attribute.split("."):
            network = getattr(network, part, None)
        if not isinstance(network, nn.Module):
            found = sorted(name for name, child in pl_module.named_children())
            raise ConfigurationError(
                f"MeanSparseCallback looks for the network at {type(pl_module).__name__}.{self.attribute}, which is "
                f"{'missing' if network is None else type(network).__name__}; give attribute= the name of the "
                f"network's attribute (its submodules: {found})."
            )
        return network

    def set_network(self, pl_module: pl.LightningModule, network: nn.Module) -> None:
        """Put the sparsified network back at :attr:`attribute`."""
        *parents, last = self.attribute.split(".")
        owner: Any = pl_module
        for part in parents:
            owner = getattr(owner, part)
        setattr(owner, last, network)

    def source_loader(self, trainer: pl.Trainer) -> DataLoader:
        """The DataLoader :attr:`data` names (before re-batching into whole batches per process)."""
        if isinstance(self.data, DataLoader):
            return self.data
        datamodule = trainer.datamodule
        method = "calibration_dataloader" if self.data == "calibration" else "train_dataloader"
        if datamodule is None or not callable(getattr(datamodule, method, None)):
            raise ConfigurationError(
                f"MeanSparseCallback(data={self.data!r}) needs a datamodule with {method}() (the training split"
                f"{' without augmentation' if self.data == 'calibration' else ''}); use one of meansparse_pl.data's "
                "datamodules, give data='train' to calibrate on train_dataloader(), or data=<a DataLoader>."
            )
        return getattr(datamodule, method)()

    def output_file(self, trainer: pl.Trainer) -> Path:
        """Where the sparsified checkpoint goes."""
        return Path(self.output_path or os.path.join(trainer.default_root_dir, "meansparse.pt"))

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """An earlier run's checkpoint at the output is moved aside (``<name>.previous``): a fit that stops
        before its end leaves no MeanSparse checkpoint that looks like its own for the next step to use."""
        path = self.output_file(trainer)
        if trainer.is_global_zero and path.is_file():
            previous = path.with_name(path.name + ".previous")
            os.replace(path, previous)
            rank_zero_info(
                f"MeanSparse: moved the earlier {path} to {previous}; this fit writes a new one at its end"
            )

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.use_best_checkpoint:
            best = getattr(trainer.checkpoint_callback, "best_model_path", "")
            if best:
                self.load_best_checkpoint(pl_module, best)
        loader = self.calibration_loader(trainer)
        sparse = self.operators_of(pl_module, loader)
        progress = trainer.is_global_zero and trainer.progress_bar_callback is not None
        summary = self.calibrate(sparse, loader, progress=progress, distributed=trainer.world_size > 1)
        if self.alpha is not None:
            set_alpha(sparse, self.alpha)
        self.summary = {
            "sites": summary.sites,
            "images": summary.images,
            "seconds": round(summary.seconds, 2),
            "dtype": summary.dtype,
        }
        path = self.output_file(trainer)
        if trainer.is_global_zero:
            architecture = pl_module.architecture() if hasattr(pl_module, "architecture") else None
            self.save(sparse, path, architecture)
            rank_zero_info(
                f"MeanSparse: {summary.sites} operators, statistics over {summary.images} training images in "
                f"{summary.seconds:.1f} s; saved {path}\n{describe(sparse)}"
            )
        trainer.strategy.barrier("meansparse_saved")
        self.saved_path = path

    # ------------------------------------------------------------------------------- the steps, public
    def operators_of(self, pl_module: pl.LightningModule, loader: DataLoader) -> nn.Module:
        """The module's network with its operators: the ones it was fine-tuned with (their statistics are then
        recollected for the new weights), else new ones placed by :meth:`sparsify` and set into the module."""
        network = self.network_of(pl_module)
        if operators(network):
            # fine-tuned with its operators: same sites, statistics of the new weights (the BatchNorm running
            # statistics were kept up to date by training, on the same adversarial batches as the control's)
            rank_zero_info(
                f"MeanSparse: the model was trained with {len(operators(network))} operators; recalibrating their "
                "statistics on the fine-tuned weights"
            )
            return network
        sparse = self.sparsify(network, loader)
        self.set_network(pl_module, sparse)
        # Lightning checkpoints of this run (written before the operators existed) still load into it
        keep_operator_state_on_load(pl_module)
        return sparse

    def load_best_checkpoint(self, pl_module: pl.LightningModule, path: str | os.PathLike) -> None:
        """Load a Lightning checkpoint's weights into ``pl_module`` (safely: weights only)."""
        pl_module.load_state_dict(safe_load(path, map_location=pl_module.device)["state_dict"])
        rank_zero_info(f"MeanSparse: using the best checkpoint {path}")

    def calibration_loader(self, trainer: pl.Trainer) -> DataLoader:
        """This process's whole batches of the :attr:`data` loader's data set (its first :attr:`limit_samples`;
        none padded or repeated), with the loader's workers, collation and pinning."""
        base = self.source_loader(trainer)
        return whole_batches_of(
            base,
            trainer.world_size,
            trainer.global_rank,
            limit=self.limit_samples,
            batch_size=self.batch_size or base.batch_size or 128,
        )

    def sparsify(self, model: nn.Module, loader: DataLoader) -> nn.Module:
        """Operators at the sites of :attr:`placement`, found with the first image of ``loader``."""
        example = images_of(next(iter(loader)))[:1]
        device = next(model.parameters()).device
        return place_operators(model, example.to(device), self.placement)

    def calibrate(
        self, model: nn.Module, loader: DataLoader, *, progress: bool = True, distributed: bool | None = None
    ) -> CalibrationSummary:
        """One statistics pass (:func:`meansparse_pl.calibrate`) over ``loader``, at most :attr:`limit_batches`;
        ``distributed`` merges the processes' shards (every process must call it then)."""
        return calibrate(
            model, loader, limit_batches=self.limit_batches, progress=progress, distributed=distributed
        )

    def save(self, model: nn.Module, path: str | os.PathLike, architecture: dict[str, Any] | None) -> Path:
        """Write the sparsified checkpoint (atomically) with the calibration summary."""
        return save_checkpoint(model, path, architecture=architecture, metadata={"calibration": self.summary})


class AlphaSearchCallback(pl.Callback):
    """Choose alpha when ``fit`` ends, after the :class:`MeanSparseCallback` has sparsified and calibrated the
    model: the sweep of :class:`~meansparse_pl.alpha_search.AlphaSearch` on the datamodule's held-out split
    (never the test split), its suggestion applied to the model on every process, and the MeanSparse checkpoint
    written again with that alpha and the search result; the reports go to ``output_dir`` and the numbers to the
    trainer's loggers. List it after the MeanSparseCallback in ``trainer.callbacks``.

    The search runs on every process, each on whole batches of the held-out split on its own device, and every
    process gets the one merged result (so no process waits while another works alone, and the choice is the
    one a single process makes).

    Args:
        alphas, threat, attacks, max_clean_drop, criterion, selection, schedule, seed, batch_size: the search,
            as :class:`~meansparse_pl.alpha_search.AlphaSearch` takes them.
        limit_samples: search on the first N held-out images (None: all of them).
        output_dir: where alpha_search.md / .json / .png go (default: ``<trainer.default_root_dir>/alpha_search``).
    """

    def __init__(
        self,
        alphas: list[float] = list(PAPER_ALPHAS),  # noqa: B006 - LightningCLI reads the default from here
        threat: ThreatModel = ThreatModel(),
        attacks: AttackConfig = AttackConfig(names=list(SEARCH_ATTACKS)),
        max_clean_drop: float = 0.5,
        criterion: Criterion = "worst_case",
        selection: Selection = "highest",
        schedule: Schedule = lazy_instance(Exhaustive),
        seed: int = 0,
        batch_size: int = 128,
        limit_samples: int | None = 1000,
        output_dir: str | None = None,
    ) -> None:
        super().__init__()
        self.search = AlphaSearch.from_options(locals())
        self.limit_samples = check_optional_positive_int("limit_samples", limit_samples, "or null for all")
        self.output_dir = output_dir
        self.result: AlphaSearchResult | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self.meansparse_callback(
                trainer
            )  # a missing or misplaced MeanSparseCallback fails before training

    def meansparse_callback(self, trainer: pl.Trainer) -> MeanSparseCallback:
        """The MeanSparseCallback this search follows (it must come earlier in ``trainer.callbacks``)."""
        callbacks = list(trainer.callbacks)
        before = callbacks[: callbacks.index(self)] if self in callbacks else callbacks
        found = [c for c in before if isinstance(c, MeanSparseCallback)]
        if not found:
            raise ConfigurationError(
                "AlphaSearchCallback chooses alpha for the MeanSparseCallback's model; list a MeanSparseCallback "
                "before it in trainer.callbacks."
            )
        return found[-1]

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        meansparse = self.meansparse_callback(trainer)
        # every process on its own device, with the fit's progress-bar setting, merged over the fit's processes
        progress = trainer.is_global_zero and trainer.progress_bar_callback is not None
        network = meansparse.network_of(pl_module)
        here = single_device_trainer(network, progress=progress)
        self.result = self.run(network, trainer.datamodule, trainer=here, distributed=trainer.world_size > 1)
        alpha = self.result.suggestion()
        set_alpha(network, alpha)
        if trainer.is_global_zero:
            self.write(
                self.result, Path(self.output_dir or os.path.join(trainer.default_root_dir, "alpha_search"))
            )
            log_rows(trainer.loggers, self.result.metrics(), trainer.global_step)
        if trainer.is_global_zero and meansparse.saved_path is not None:
            architecture = pl_module.architecture() if hasattr(pl_module, "architecture") else None
            metadata = {"calibration": meansparse.summary, "alpha_search": self.result.to_json()}  # type: ignore[union-attr]
            save_checkpoint(network, meansparse.saved_path, architecture=architecture, metadata=metadata)
            rank_zero_info(
                f"MeanSparse: alpha {alpha:g} chosen on the held-out split; saved {meansparse.saved_path}"
            )
        trainer.strategy.barrier("alpha_search_saved")

    def run(
        self,
        model: nn.Module,
        datamodule: pl.LightningDataModule,
        trainer: pl.Trainer | None = None,
        distributed: bool | None = None,
    ) -> AlphaSearchResult:
        """The sweep on the first ``limit_samples`` images of the datamodule's held-out split (``trainer`` and
        ``distributed`` as :meth:`AlphaSearch.run <meansparse_pl.alpha_search.AlphaSearch.run>` takes them)."""
        held_out = split_samples(datamodule, "val", self.limit_samples)
        return self.search.run(model, held_out, trainer=trainer, distributed=distributed)

    def write(self, result: AlphaSearchResult, folder: Path) -> None:
        """alpha_search.md / .json / .png in ``folder``."""
        result.write(folder)
