"""Save and load sparsified models safely.

A checkpoint holds the weights, every operator's buffers (statistics and alpha) and the placement record,
so loading can rebuild the operators in the same places on a fresh instance of the architecture. Files are
written atomically and read with ``torch.load(weights_only=True)``: no pickled code is ever executed, and a
file that needs it is refused. Lightning checkpoints written by ``Trainer.save_checkpoint`` for an
:class:`~meansparse_pl.module.AdversarialClassifier` carry the same ``meansparse`` entry and load too.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from meansparse_pl.errors import CheckpointError, MeanSparseError
from meansparse_pl.io import atomic_torch_save, load_error_detail, safe_load
from meansparse_pl.models import create_model
from meansparse_pl.ops import get_alpha, operators
from meansparse_pl.placement import Placement, placement_of, sparsify_like

FORMAT = "meansparse_pl.checkpoint/1"
LIGHTNING_PREFIX = "model."


def placement_record(model: nn.Module, architecture: dict[str, Any] | None = None) -> dict[str, Any]:
    """The ``meansparse`` entry of a checkpoint: placement, alpha and (optionally) how to build the model."""
    return {
        "format": FORMAT,
        "placement": placement_of(model).to_dict(),
        "alpha": get_alpha(model),
        "calibrated": all(op.is_calibrated for op in operators(model)),
        "architecture": architecture,
    }


def save_checkpoint(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    architecture: dict[str, Any] | None = None,
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Write ``model`` (a sparsified model) atomically.

    Args:
        architecture: ``{"name": <meansparse_pl.models name>, "kwargs": {...}}`` lets :func:`load_checkpoint`
            build the model itself; without it the caller passes a fresh model instance when loading.
        metadata: plain values (numbers, strings, lists, dicts) stored alongside, e.g. the alpha-search result.
    """
    payload = {
        "state_dict": model.state_dict(),
        "meansparse": placement_record(model, architecture),
        "metadata": metadata or {},
    }
    return atomic_torch_save(payload, path)


def _model_state(payload: dict[str, Any]) -> dict[str, torch.Tensor]:
    state = payload.get("state_dict", payload)
    if not isinstance(state, dict) or not state:
        raise CheckpointError("the checkpoint has no state_dict.")
    if any(isinstance(k, str) and k.startswith(LIGHTNING_PREFIX) for k in state):
        # a Lightning checkpoint of a LightningModule that wraps the network as `self.model`
        state = {k[len(LIGHTNING_PREFIX) :]: v for k, v in state.items() if k.startswith(LIGHTNING_PREFIX)}
    return state


def load_checkpoint(
    path: str | os.PathLike,
    model: nn.Module | None = None,
    *,
    fallback_model: nn.Module | None = None,
    map_location: str | torch.device = "cpu",
) -> nn.Module:
    """Rebuild a sparsified model from ``path``.

    ``model`` is a fresh instance of the architecture (its weights are overwritten); when omitted, the
    checkpoint's ``architecture`` record builds it from the meansparse_pl model registry, and
    ``fallback_model`` is used for files that record none. Nothing named in the file is imported or executed
    beyond that registry.
    """
    payload = safe_load(path, map_location)
    record = payload.get("meansparse")
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise CheckpointError(
            f"{path} is not a meansparse_pl checkpoint (no '{FORMAT}' record); for a plain trained model "
            "use `cli.py postprocess` to sparsify and calibrate it first."
        )
    if model is None:
        if fallback_model is not None and not record.get("architecture"):
            model = fallback_model
        else:
            model = _build_architecture(record.get("architecture"), path)
    try:
        sparse = rebuild_operators(model, record)
    except CheckpointError as error:
        raise CheckpointError(f"{path}: {error}") from error
    _load_state(sparse, _model_state(payload), path, "is it the right architecture?")
    return sparse


def load_weights(
    network: nn.Module, path: str | os.PathLike, *, hint: str = "is it the right architecture?"
) -> None:
    """Load trained weights into ``network``: a plain state dict, or a Lightning checkpoint of a module that
    wraps the network as ``self.model``; safely (weights_only) and strictly, with one clear error."""
    _load_state(network, _model_state(safe_load(path)), path, hint)


def _load_state(
    network: nn.Module, state: dict[str, torch.Tensor], path: str | os.PathLike, hint: str
) -> None:
    try:
        network.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise CheckpointError(
            f"{path}: weights do not fit the model ({load_error_detail(error)}); {hint}"
        ) from error


def rebuild_operators(model: nn.Module, record: dict[str, Any]) -> nn.Module:
    """Insert operators into a fresh ``model`` exactly where the checkpoint ``record`` says they were."""
    placement = Placement.from_dict(record["placement"])
    try:
        sparse = sparsify_like(model, placement)
    except MeanSparseError as error:
        raise CheckpointError(f"cannot rebuild the operators on this model: {error}") from error
    rebuilt = [(s.index, s.channel_dim, s.num_channels) for s in placement_of(sparse).sites]
    saved = [(s.index, s.channel_dim, s.num_channels) for s in placement.sites]
    if rebuilt != saved:
        first = next(
            (i for i, (a, b) in enumerate(zip(rebuilt, saved, strict=False)) if a != b),
            min(len(rebuilt), len(saved)),
        )
        raise CheckpointError(
            f"the model has {len(rebuilt)} operator sites, the checkpoint {len(saved)}, first difference at "
            f"position {first} (index, channel dim, channels); the checkpoint belongs to another architecture."
        )
    return sparse


def _build_architecture(architecture: Any, path: str | os.PathLike) -> nn.Module:
    if not isinstance(architecture, dict) or "name" not in architecture:
        raise CheckpointError(
            f"{path} does not record its architecture; pass a fresh model instance: load_checkpoint(path, model)."
        )
    return create_model(architecture["name"], **dict(architecture.get("kwargs") or {}))
