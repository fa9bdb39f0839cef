"""Load RobustBench models offline, from a local directory in RobustBench's layout.

``robustbench.utils.load_model`` downloads missing files and reads them with ``torch.load`` in its unsafe
(pickle-executing) mode. This adapter does neither: it builds the architecture from RobustBench's model-zoo
entry (random weights; :mod:`meansparse_pl.models.robustbench_zoo`, registry name ``robustbench``), reads
``<model_dir>/<dataset>/<threat_model>/<name>.pt`` with ``torch.load(weights_only=True)``, applies
RobustBench's state-dict conventions itself, and loads the weights. A missing file is a
:class:`~meansparse_pl.errors.DataNotFoundError` that says where the file must be and how to get it.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from meansparse_pl.errors import CheckpointError, DataNotFoundError
from meansparse_pl.io import safe_load
from meansparse_pl.models.robustbench_zoo import (
    build_architecture,
    import_model_zoo,
    make_traceable,
    model_entry,
    normalise_dataset,
    normalise_threat_model,
)

__all__ = [
    "build_architecture",
    "checkpoint_path",
    "import_model_zoo",
    "load_model",
    "load_robustbench_weights",
    "load_robustbench_state",
    "make_traceable",
    "model_entry",
    "normalise_dataset",
    "normalise_threat_model",
    "robustbench_state_dict",
]

# state-dict keys robustbench itself tolerates as missing (input normalisation that lives outside the file)
_BENIGN_MISSING = {"normalize.mean", "normalize.std", "mu", "sigma", "mean", "std"}
# ImageNet models robustbench loads without adding the 'model.' prefix (no normalisation wrapper)
_IMAGENET_NO_PREFIX = {
    "Singh2023Revisiting_ConvNeXt-T-ConvStem",
    "Singh2023Revisiting_ViT-B-ConvStem",
    "Singh2023Revisiting_ConvNeXt-S-ConvStem",
    "Singh2023Revisiting_ConvNeXt-B-ConvStem",
    "Singh2023Revisiting_ConvNeXt-L-ConvStem",
    "Peng2023Robust",
    "Chen2024Data_WRN_50_2",
    "Xu2024MIMIR_Swin-B",
    "Xu2024MIMIR_Swin-L",
}
# ImageNet Swin checkpoints saved with an older timm; robustbench converts them with timm's filter
_OLD_TIMM_SWIN = {
    "Liu2023Comprehensive_Swin-B",
    "Liu2023Comprehensive_Swin-L",
    "Mo2022When_Swin-B",
    "RodriguezMunoz2024Characterizing_Swin-B",
    "RodriguezMunoz2024Characterizing_Swin-L",
}


def checkpoint_path(model_dir: str | os.PathLike, name: str, dataset: str, threat_model: str) -> Path:
    """Where RobustBench keeps a model: ``<model_dir>/<dataset>/<threat_model>/<name>.pt``."""
    return Path(model_dir) / normalise_dataset(dataset) / normalise_threat_model(threat_model) / f"{name}.pt"


# ---------------------------------------------------------------------------------------- weights
def _strip(state: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    return {(k[len(prefix) :] if k.startswith(prefix) else k): v for k, v in state.items()}


def robustbench_state_dict(
    payload: Mapping[str, Any], name: str, dataset: str, model: nn.Module | None = None
) -> dict[str, torch.Tensor]:
    """The state dict RobustBench's ``load_model`` would load from ``payload`` (a loaded ``.pt`` file).

    Conventions, as in robustbench 1.1.1: the weights may sit under ``state_dict`` (or ``model_state_dict``;
    ``last`` for two models); the prefixes ``module.`` (DataParallel) and ``model.`` are removed; ImageNet
    Swin checkpoints of older timm versions are converted with timm's ``checkpoint_filter_fn``; and ImageNet
    models, which RobustBench wraps as ``Sequential(normalize, model)``, get ``model.`` back.
    """
    state: Any = payload
    if "Kireev2021Effectiveness" in name or name == "Andriushchenko2020Understanding":
        state = state.get("last", state)
    for key in ("state_dict", "model_state_dict"):
        if isinstance(state, Mapping) and isinstance(state.get(key), Mapping):
            state = state[key]
            break
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"the {name} checkpoint holds no state dict of tensors.")
    state = _strip(_strip(state, "module."), "model.")
    if normalise_dataset(dataset) == "imagenet":
        if name in _OLD_TIMM_SWIN and model is not None and hasattr(model, "model"):
            from timm.models.swin_transformer import checkpoint_filter_fn

            with contextlib.suppress(Exception):  # robustbench ignores a failing conversion too
                state = checkpoint_filter_fn(state, model.model)
        if name not in _IMAGENET_NO_PREFIX:
            state = {f"model.{k}": v for k, v in state.items()}
    return dict(state)


def load_robustbench_state(model: nn.Module, state: dict[str, torch.Tensor], path: str | os.PathLike) -> None:
    """``load_state_dict`` strictly, tolerating only what robustbench tolerates: missing input-normalisation
    buffers (``normalize.mean`` / ``std``, ``mu`` / ``sigma``) that live outside some checkpoints."""
    try:
        model.load_state_dict(state, strict=True)
        return
    except RuntimeError:
        pass
    result = model.load_state_dict(state, strict=False) if _only_benign_missing(model, state) else None
    if result is None:
        own = set(model.state_dict())
        missing = sorted(own - set(state))
        unexpected = sorted(set(state) - own)
        mismatched = sorted(
            k for k in own & set(state) if tuple(model.state_dict()[k].shape) != tuple(state[k].shape)
        )
        detail = (
            f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}" if unexpected else ""
        ) or f"shape mismatch at {mismatched[:3]}"
        raise CheckpointError(f"{path}: the weights do not fit the RobustBench architecture ({detail}).")


def _only_benign_missing(model: nn.Module, state: dict[str, torch.Tensor]) -> bool:
    own = model.state_dict()
    missing = set(own) - set(state)
    unexpected = set(state) - set(own)
    shapes_fit = all(tuple(own[k].shape) == tuple(v.shape) for k, v in state.items() if k in own)
    return not unexpected and shapes_fit and all(k.split(".", 1)[-1] in _BENIGN_MISSING for k in missing)


def load_robustbench_weights(
    model: nn.Module,
    path: str | os.PathLike,
    name: str,
    dataset: str = "cifar10",
    map_location: str | torch.device = "cpu",
) -> nn.Module:
    """Load a RobustBench checkpoint file into ``model`` (RobustBench's conventions, weights_only)."""
    payload = safe_load(path, map_location)
    load_robustbench_state(model, robustbench_state_dict(payload, name, dataset, model), path)
    return model


def load_model(
    name: str,
    model_dir: str | os.PathLike = "models",
    dataset: str = "cifar10",
    threat_model: str = "Linf",
    *,
    weights: str | os.PathLike | None = None,
    map_location: str | torch.device = "cpu",
) -> nn.Module:
    """A RobustBench model with its weights, offline, in eval mode.

    ``weights`` reads the weights from that file instead of the RobustBench layout (e.g. a published
    checkpoint of the same architecture kept elsewhere); the same conventions apply.

    Raises:
        DataNotFoundError: the checkpoint is not at ``<model_dir>/<dataset>/<threat_model>/<name>.pt``.
        CheckpointError: the file is unsafe to load, corrupt, or does not fit the architecture.
        ConfigurationError: unknown model, dataset or threat model; robustbench not installed.
    """
    entry = model_entry(name, dataset, threat_model)
    path = Path(weights) if weights is not None else checkpoint_path(model_dir, name, dataset, threat_model)
    if weights is not None and not path.is_file():
        raise DataNotFoundError(f"no weights file at {path}.")
    if not path.is_file():
        gdrive = entry.get("gdrive_id")
        raise DataNotFoundError(
            f"RobustBench model {name} is not at {path}: the offline adapter never downloads. Put the file "
            f"there (RobustBench layout <model_dir>/<dataset>/<threat_model>/<name>.pt), e.g. by running "
            f"robustbench.utils.load_model({name!r}, model_dir=..., dataset={normalise_dataset(dataset)!r}, "
            f"threat_model={normalise_threat_model(threat_model)!r}) once on a machine with network access"
            + (f" (Google Drive id {gdrive})." if isinstance(gdrive, str) else ".")
        )
    model = build_architecture(name, dataset, threat_model)
    return load_robustbench_weights(model, path, name, dataset, map_location).eval()
