"""What the CLI subcommands share: which model a checkpoint holds, which trained weights to load, which samples
to use. Kept apart from :mod:`meansparse_pl.trainer`, whose methods are the subcommands' option lists."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from torch import nn
from torch.utils.data import Dataset, Subset

from meansparse_pl.checkpoint import load_checkpoint, load_weights
from meansparse_pl.config import check_optional_positive_int
from meansparse_pl.errors import CheckpointError, ConfigurationError
from meansparse_pl.ops import require_operators
from meansparse_pl.robustbench import load_robustbench_weights


def first_samples(dataset: Dataset, limit: int | None) -> Dataset:
    """The first ``limit`` samples of ``dataset`` (all of them for None)."""
    limit = check_optional_positive_int("limit_samples", limit, "or null for every sample")
    if limit is None or limit >= len(dataset):  # type: ignore[arg-type]
        return dataset
    return Subset(dataset, range(limit))


def calibrated_model(checkpoint: str, fallback: nn.Module | None) -> nn.Module:
    """The sparsified model of ``checkpoint``; every operator must carry statistics."""
    sparse = load_checkpoint(checkpoint, fallback_model=fallback)
    if not all(op.is_calibrated for op in require_operators(sparse)):
        raise CheckpointError(
            f"{checkpoint} has uncalibrated MeanSparse operators; run `cli.py postprocess` on it first."
        )
    return sparse


def load_trained_weights(module: pl.LightningModule, checkpoint: str, *, from_network: bool) -> None:
    """Weights for ``postprocess``: a RobustBench file (its own key conventions) for a ``robustbench``
    backbone, else a Lightning checkpoint or a plain state dict of the network."""
    hparams: Any = getattr(module, "hparams", {})
    if not from_network and hparams.get("backbone") == "robustbench":
        options = hparams.get("backbone_kwargs") or {}
        if "model_name" not in options:
            raise ConfigurationError(
                "backbone robustbench needs backbone_kwargs.model_name (a RobustBench name)."
            )
        load_robustbench_weights(
            module.model, checkpoint, options["model_name"], options.get("dataset", "cifar10")
        )
        return
    load_weights(module.model, checkpoint, hint="check model.backbone / backbone_kwargs or --network.")
