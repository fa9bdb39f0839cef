"""MeanSparseCallback: turn the trained model into a MeanSparse model when ``fit`` ends.

Like Lightning's ``ModelPruning``, it is configured only by constructor arguments (so LightningCLI exposes
them under ``trainer.callbacks``) and hooks a fit boundary. At fit end it takes the best checkpoint's
weights (the paper keeps the epoch with the best PGD validation accuracy), inserts the operators, collects
the channel statistics over the training split in one pass and saves the sparsified checkpoint.

Under DDP each process reads a disjoint, unpadded shard of the training split (Lightning's training
sampler would pad the last batch with repeated samples, which must not enter the statistics); the
per-process moments are merged exactly, so the result equals a single-process pass. Rank 0 writes the
file while the others wait at a barrier.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from meansparse_pl.calibration import StatisticsCollector, _inputs_of
from meansparse_pl.checkpoint import safe_load, save_checkpoint
from meansparse_pl.errors import ConfigurationError
from meansparse_pl.operator import Centre, check_alpha, set_alpha
from meansparse_pl.placement import Strategy, describe, sparsify


def unpadded_shard(dataset: Any, rank: int, world_size: int) -> Subset:
    """Indices rank, rank + W, ...: every sample in exactly one shard, none repeated (unlike padding)."""
    return Subset(dataset, list(range(rank, len(dataset), world_size)))


class MeanSparseCallback(pl.Callback):
    """Insert MeanSparse operators and collect their statistics at the end of ``fit``.

    Args:
        alpha: alpha stored in the saved model (0 keeps it identical to the base model; choose alpha with
            ``cli.py alpha_search`` afterwards).
        include / exclude: fnmatch patterns on activation module paths (see :func:`meansparse_pl.sparsify`).
        sites: keep only these activation site indices (paper A.9 ablations).
        centre: band centre: channel_mean (paper), zero or global_mean (paper A.7).
        strategy: placement strategy: auto, fx or hooks.
        leaf_modules: fnmatch patterns of submodules torch.fx should not trace into.
        preset: site rule: activations (paper) or published_wrn / published_convnext / published_swin.
        use_best_checkpoint: load the ``ModelCheckpoint`` callback's best weights before sparsifying.
        limit_batches: collect statistics on only this many batches per process (None: the whole split).
        batch_size: calibration batch size (None: the datamodule's).
        output_path: where to write the sparsified checkpoint (default: ``<trainer.default_root_dir>/meansparse.pt``).
    """

    def __init__(
        self,
        alpha: float = 0.0,
        include: Sequence[str] | None = None,
        exclude: Sequence[str] | None = None,
        sites: Sequence[int] | None = None,
        centre: Centre = "channel_mean",
        strategy: Strategy = "auto",
        leaf_modules: Sequence[str] = (),
        preset: str = "activations",
        use_best_checkpoint: bool = True,
        limit_batches: int | None = None,
        batch_size: int | None = None,
        output_path: str | None = None,
    ) -> None:
        super().__init__()
        self.alpha = check_alpha(alpha)
        if limit_batches is not None and limit_batches < 1:
            raise ConfigurationError(f"limit_batches must be >= 1 or null, got {limit_batches}.")
        self.placement_options: dict[str, Any] = {
            "include": include,
            "exclude": exclude,
            "sites": sites,
            "centre": centre,
            "strategy": strategy,
            "leaf_modules": tuple(leaf_modules),
            "preset": preset,
        }
        self.use_best_checkpoint = use_best_checkpoint
        self.limit_batches = limit_batches
        self.batch_size = batch_size
        self.output_path = output_path
        self.saved_path: Path | None = None
        self.summary: dict[str, Any] = {}

    # ------------------------------------------------------------------------------------------- hooks
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        start = time.perf_counter()
        self._load_best_weights(trainer, pl_module)
        loader = self._calibration_loader(trainer)
        first_batch = _inputs_of(next(iter(loader)))
        sparse = sparsify(pl_module.model, first_batch[:1].to(pl_module.device), **self.placement_options)
        pl_module.model = sparse
        collector = StatisticsCollector(sparse)
        total = len(loader) if self.limit_batches is None else min(self.limit_batches, len(loader))
        with collector.observing():
            progress = tqdm(
                loader, total=total, desc="MeanSparse statistics", disable=not trainer.is_global_zero
            )
            for i, batch in enumerate(progress):
                if self.limit_batches is not None and i >= self.limit_batches:
                    break
                collector.observe(_inputs_of(batch).to(pl_module.device))
        images = collector.finish()  # all-gathers and merges across processes
        set_alpha(sparse, self.alpha)
        seconds = time.perf_counter() - start
        self.summary = {"sites": len(collector.operators), "images": images, "seconds": round(seconds, 2)}
        path = Path(self.output_path or os.path.join(trainer.default_root_dir, "meansparse.pt"))
        if trainer.is_global_zero:
            architecture = pl_module.architecture() if hasattr(pl_module, "architecture") else None
            save_checkpoint(sparse, path, architecture=architecture, metadata={"calibration": self.summary})
            rank_zero_info(
                f"MeanSparse: {self.summary['sites']} operators, statistics over {images} training images in "
                f"{seconds:.1f} s; saved {path}\n{describe(sparse)}"
            )
        trainer.strategy.barrier("meansparse_saved")
        self.saved_path = path

    # ----------------------------------------------------------------------------------------- helpers
    def _load_best_weights(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        checkpoint_callback = trainer.checkpoint_callback
        best = getattr(checkpoint_callback, "best_model_path", "") if self.use_best_checkpoint else ""
        if best:
            state = safe_load(best, map_location=pl_module.device)["state_dict"]
            pl_module.load_state_dict(state)
            rank_zero_info(f"MeanSparse: using the best checkpoint {best}")

    def _calibration_loader(self, trainer: pl.Trainer) -> DataLoader:
        datamodule = trainer.datamodule
        if datamodule is None or not hasattr(datamodule, "calibration_dataloader"):
            raise ConfigurationError(
                "MeanSparseCallback needs a datamodule with calibration_dataloader() (the training split "
                "without augmentation); use one of meansparse_pl.data's datamodules."
            )
        base = datamodule.calibration_dataloader()
        shard = unpadded_shard(base.dataset, trainer.global_rank, trainer.world_size)
        return DataLoader(
            shard,
            batch_size=self.batch_size or base.batch_size or 128,
            shuffle=False,
            num_workers=base.num_workers,
            pin_memory=torch.cuda.is_available(),
        )
