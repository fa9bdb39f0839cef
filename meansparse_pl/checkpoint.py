"""Save and load sparsified models safely.

A checkpoint holds the weights, every operator's buffers (statistics and alpha) and the placement record,
so loading can rebuild the operators in the same places on a fresh instance of the architecture. Files are
written atomically and read with ``torch.load(weights_only=True)``: no pickled code is ever executed, and a
file that needs it is refused. Lightning checkpoints written by ``Trainer.save_checkpoint`` for an
:class:`~meansparse_pl.module.AdversarialClassifier` carry the same ``meansparse`` entry and load too.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from meansparse_pl.architecture import build_registry_model, check_architecture, network_options
from meansparse_pl.config import ComparedModel
from meansparse_pl.errors import (
    RECREATE_FILE,
    CheckpointError,
    ConfigurationError,
    MeanSparseError,
    StatisticsError,
)
from meansparse_pl.io import atomic_torch_save, file_version, load_error_detail, safe_load
from meansparse_pl.ops import MeanSparse, operators, require_operators, set_alpha
from meansparse_pl.placement import Placement, placement_of, sparsify_like

FORMAT = "meansparse_pl.checkpoint/1"
LIGHTNING_PREFIX = "model."


def placement_record(model: nn.Module, architecture: dict[str, Any] | None = None) -> dict[str, Any]:
    """The ``meansparse`` entry of a checkpoint: placement, alpha and (optionally) how to build the model.

    ``alpha`` is the one value every operator shares, or None where they differ (each operator's own alpha is
    in the state dict either way)."""
    values = {float(op.alpha) for op in operators(model)}
    return {
        "format": FORMAT,
        "placement": placement_of(model).to_dict(),
        "alpha": values.pop() if len(values) == 1 else None,
        "calibrated": all(op.is_calibrated for op in operators(model)),
        "architecture": check_architecture(architecture, "the architecture to save"),
    }


def save_checkpoint(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    architecture: dict[str, Any] | None = None,
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Write ``model`` (a sparsified model) atomically; operators may carry different alphas.

    Args:
        architecture: how :func:`load_checkpoint` rebuilds the network: ``{"name": <meansparse_pl.models name>,
            "kwargs": {...}}`` (rebuilt automatically) or ``{"class_path": ..., "init_args": {...}}``
            (recorded as text; the loader asks for the model instead of importing it). Without it the caller
            passes a fresh model instance when loading.
        metadata: plain values (numbers, strings, lists, dicts) stored alongside, e.g. the alpha-search result.
    """
    payload = {
        "state_dict": model.state_dict(),
        "meansparse": placement_record(model, architecture),
        "metadata": metadata or {},
    }
    return atomic_torch_save(payload, path)


def resave_checkpoint(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    read_version: tuple[int, int, int] | None,
    metadata: dict[str, Any],
) -> Path:
    """Save ``model`` over the checkpoint it was loaded from, keeping the file's architecture record and metadata
    (updated with ``metadata``). Refused when the file is no longer the version read (``read_version``, from
    :func:`~meansparse_pl.io.file_version`): another program rewrote it meanwhile, and its update would be
    lost."""
    if file_version(path) != read_version:
        raise CheckpointError(
            f"{path} was rewritten by another program since it was read, so nothing was stored in it (that "
            "program's file is kept); run the step again on the new file."
        )
    payload = safe_load(path)
    record = payload.get("meansparse") if isinstance(payload.get("meansparse"), dict) else {}
    merged = {**(payload.get("metadata") or {}), **metadata}
    return save_checkpoint(model, path, architecture=record.get("architecture"), metadata=merged)


def keep_operator_state_on_load(module: nn.Module) -> None:
    """After operators were inserted into ``module``'s network, a state dict written before they existed (a
    Lightning checkpoint of the training run: ``trainer.test(ckpt_path="best")``, ``fit(ckpt_path="last")``)
    still loads into it: the operators' buffers missing from such a state dict keep their current values (the
    statistics just collected), with one line saying so. A state dict that has them loads them as usual."""
    operator_keys = {
        f"{name}.{buffer}" if name else buffer
        for name, op in module.named_modules()
        if isinstance(op, MeanSparse)
        for buffer, _ in op.named_buffers(recurse=False)
    }

    def fill_missing_operator_state(
        target: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any
    ) -> None:
        missing = [key for key in sorted(operator_keys) if prefix + key not in state_dict]
        if not missing or len(missing) != len(operator_keys):
            return  # a state dict of the sparsified model (complete or not: load_state_dict reports it)
        current = target.state_dict()
        for key in missing:
            state_dict[prefix + key] = current[key]
        rank_zero_info(
            "MeanSparse: the state dict has no operator buffers (written before the operators were inserted); "
            f"the {len(operators(target))} operators keep their current statistics and alphas"
        )

    module.register_load_state_dict_pre_hook(fill_missing_operator_state)


def model_state(
    payload: dict[str, Any], where: str | os.PathLike = "the checkpoint"
) -> dict[str, torch.Tensor]:
    """The network's state dict in a loaded file: a plain state dict, our checkpoint's ``state_dict``, or a
    Lightning checkpoint of a module that wraps the network as ``self.model`` (or as any one attribute, e.g.
    ``self.net``: the one prefix all its weights share); only tensors are accepted."""
    state = payload.get("state_dict", payload)
    if not isinstance(state, dict) or not state:
        raise CheckpointError(f"{where} has no state_dict (a dictionary of tensors); {RECREATE_FILE}.")
    if any(isinstance(k, str) and k.startswith(LIGHTNING_PREFIX) for k in state):
        state = {k[len(LIGHTNING_PREFIX) :]: v for k, v in state.items() if k.startswith(LIGHTNING_PREFIX)}
    elif (
        "pytorch-lightning_version" in payload
    ):  # a Lightning module keeping its network elsewhere (self.net)
        heads = sorted({k.split(".", 1)[0] for k in state if isinstance(k, str) and "." in k})
        if len(heads) != 1:
            raise CheckpointError(
                f"{where} is a Lightning checkpoint of a module whose weights sit under {heads}, not one network "
                "attribute; save the network's own state dict (torch.save(module.<network>.state_dict(), path)) "
                "and give that file."
            )
        prefix = heads[0] + "."
        state = {k[len(prefix) :]: v for k, v in state.items() if isinstance(k, str) and k.startswith(prefix)}
    if not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise CheckpointError(
            f"{where}: the state_dict holds entries that are not tensors; the file is corrupt."
        )
    return state


def checkpoint_record(payload: dict[str, Any], path: str | os.PathLike) -> dict[str, Any]:
    """The ``meansparse`` record of a loaded file, every field checked before anything is built from it."""
    record = payload.get("meansparse")
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise CheckpointError(
            f"{path} is not a meansparse_pl checkpoint (no '{FORMAT}' record); for a plain trained model "
            "use `cli.py postprocess` to sparsify and calibrate it first."
        )
    alpha = record.get("alpha")
    if alpha is not None and (
        isinstance(alpha, bool) or not isinstance(alpha, int | float) or not alpha >= 0
    ):
        raise CheckpointError(
            f"{path}: the record's alpha {alpha!r} is not a number >= 0; the file is corrupt."
        )
    if not isinstance(record.get("calibrated", False), bool):
        raise CheckpointError(
            f"{path}: the record's 'calibrated' flag is not true or false; the file is corrupt."
        )
    try:
        placement = Placement.from_dict(record.get("placement"))
    except CheckpointError as error:
        raise CheckpointError(f"{path}: {error}") from None
    return {
        **record,
        "placement": placement,
        "architecture": check_architecture(record.get("architecture"), str(path)),
    }


def load_checkpoint(
    path: str | os.PathLike,
    model: nn.Module | None = None,
    *,
    fallback_model: nn.Module | None = None,
    map_location: str | torch.device = "cpu",
) -> nn.Module:
    """Rebuild a sparsified model from ``path``.

    ``model`` is a fresh instance of the architecture (its weights are overwritten); when omitted, the
    checkpoint's ``architecture`` record builds it from the meansparse_pl model registry (after checking, on
    the meta device, that the record fits the file's tensors), and ``fallback_model`` is used for files that
    record none. Nothing named in the file is imported or executed beyond that registry: a file saved from a
    network class names the ``--network`` options to pass instead. Every field of the file is checked before
    use (statistics finite, variances and counts not negative, alpha a number >= 0, the placement record's
    types, the tensor shapes).
    """
    payload = safe_load(path, map_location)
    record = checkpoint_record(payload, path)
    state = model_state(payload, path)
    architecture = record["architecture"]
    if model is None:
        if architecture is None:
            if fallback_model is None:
                raise CheckpointError(
                    f"{path} does not record its architecture; pass a fresh model instance: "
                    "load_checkpoint(path, model)."
                )
            model = fallback_model
        elif "class_path" in architecture:
            raise CheckpointError(
                f"{path} was saved from the network {architecture['class_path']}, which is not in the model "
                "registry, and a class named inside a file is never imported; pass a fresh instance "
                f"(load_checkpoint(path, model)) or, on the command line, {network_options(architecture)}"
            )
        else:
            model = build_registry_model(architecture, state, str(path))
    try:
        sparse = rebuild_operators(model, record["placement"])
    except CheckpointError as error:
        raise CheckpointError(f"{path}: {error}") from None
    if record.get("calibrated") and not all(
        int(state.get(f"{name}.count", torch.ones(()))) != 0 for name in _operator_paths(sparse)
    ):
        raise CheckpointError(
            f"{path}: operators marked calibrated have no element count; the file is corrupt."
        )
    _load_state(sparse, state, path, "is it the right architecture?")
    return sparse


def load_model_or_weights(
    path: str | os.PathLike, model: nn.Module | None = None, *, fallback_model: nn.Module | None = None
) -> nn.Module:
    """The model of ``path``: a file with a MeanSparse record (ours, or a Lightning checkpoint of a sparsified
    module) is loaded as :func:`load_checkpoint` does (on ``model``, else on the architecture it records, else on
    ``fallback_model``); any other file (a Lightning checkpoint or a plain state dict) loads its weights into
    ``model`` (or ``fallback_model``). Safely, strictly, with one clear error."""
    payload = safe_load(path)
    if isinstance(payload, dict) and "meansparse" in payload:
        return load_checkpoint(path, model, fallback_model=fallback_model)
    target = model if model is not None else fallback_model
    if target is None:
        raise CheckpointError(f"{path} holds plain weights; pass the network to load them into.")
    _load_state(target, model_state(payload, path), path, "is it the right architecture?")
    return target


def load_calibrated(
    path: str | os.PathLike, model: nn.Module | None = None, *, fallback_model: nn.Module | None = None
) -> nn.Module:
    """The sparsified model of ``path`` as :func:`load_checkpoint` rebuilds it, refused with one line when an
    operator carries no statistics (the file of ``alpha_search``, ``evaluate`` and ``diagnose``)."""
    sparse = load_checkpoint(path, model, fallback_model=fallback_model)
    _check_calibrated(require_operators(sparse), path)
    return sparse


def _check_calibrated(found: list[MeanSparse], path: str | os.PathLike) -> None:
    """One line when an operator of the file ``path`` carries no statistics."""
    if not all(op.is_calibrated for op in found):
        raise CheckpointError(
            f"{path} has uncalibrated MeanSparse operators; run `cli.py postprocess` on it first."
        )


def load_compared(entry: ComparedModel, network: nn.Module | None, fallback: nn.Module | None) -> nn.Module:
    """One model of ``compare``: a MeanSparse checkpoint (its operators calibrated; on a fresh copy of ``network``,
    else on the architecture it records, else on a copy of the model section's network) or plain trained weights
    (on a copy of ``network`` or of the model section's network), with ``entry.alpha`` set when given."""
    if network is None and fallback is None:
        raise ConfigurationError(
            f"{entry.label}: no network to load {entry.checkpoint} into; give --network."
        )
    loaded = load_model_or_weights(
        entry.checkpoint, copy.deepcopy(network), fallback_model=copy.deepcopy(fallback)
    )
    _check_calibrated(operators(loaded), entry.checkpoint)
    if entry.alpha is not None:
        if operators(loaded):
            set_alpha(loaded, entry.alpha)
        elif entry.alpha != 0:
            raise ConfigurationError(
                f"{entry.label}: alpha {entry.alpha:g} given, but {entry.checkpoint} has no MeanSparse operators; "
                "give a MeanSparse checkpoint or leave alpha out."
            )
    return loaded


def _operator_paths(model: nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, MeanSparse)]


def load_weights(
    network: nn.Module, path: str | os.PathLike, *, hint: str = "is it the right architecture?"
) -> None:
    """Load trained weights into ``network``: a plain state dict, or a Lightning checkpoint of a module that
    wraps the network as ``self.model``; safely (weights_only) and strictly, with one clear error."""
    _load_state(network, model_state(safe_load(path), path), path, hint)


def _load_state(
    network: nn.Module, state: dict[str, torch.Tensor], path: str | os.PathLike, hint: str
) -> None:
    """``load_state_dict`` (strict), with a misfit described in one line: missing and unexpected keys and shape
    mismatches counted, the first of each named; and the operators' buffers checked on the way in."""
    own = network.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)]
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing, first {missing[0]}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected, first {unexpected[0]}")
        if mismatched:
            key = mismatched[0]
            parts.append(
                f"{len(mismatched)} of another shape, first {key}: file {tuple(state[key].shape)}, model {tuple(own[key].shape)}"
            )
        raise CheckpointError(f"{path}: weights do not fit the model ({'; '.join(parts)}); {hint}")
    try:
        network.load_state_dict(state, strict=True)
    except StatisticsError as error:
        raise CheckpointError(f"{path}: {error}") from None
    except RuntimeError as error:
        raise CheckpointError(
            f"{path}: weights do not fit the model ({load_error_detail(error)}); {hint}"
        ) from None


def rebuild_operators(model: nn.Module, placement: Placement | dict[str, Any]) -> nn.Module:
    """Insert operators into a fresh ``model`` exactly where the placement record says they were."""
    if not isinstance(placement, Placement):
        placement = Placement.from_dict(placement.get("placement") if "format" in placement else placement)
    try:
        sparse = sparsify_like(model, placement)
    except MeanSparseError as error:
        raise CheckpointError(f"cannot rebuild the operators on this model: {error}") from None
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
