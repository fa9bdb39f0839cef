"""The arguments of :class:`~meansparse_pl.module.AdversarialClassifier` checked once (one line naming the problem
and the fix) and turned into plain Python types, so that its checkpoints load with ``torch.load(weights_only=True)``
and rebuild the same module."""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from typing import Any, Literal

from meansparse_pl.config import (
    ThreatModel,
    check_alpha,
    check_choice,
    check_number,
    check_positive_int,
    deprecated,
)
from meansparse_pl.errors import ConfigurationError
from meansparse_pl.ops import check_backward_mode

Objective = Literal["standard", "pgd", "trades"]
OBJECTIVES: tuple[str, ...] = ("standard", "pgd", "trades")
OPTIMIZERS: tuple[str, ...] = ("sgd", "adam")
Normalization = tuple[tuple[float, ...], tuple[float, ...]]


def plain_normalization(normalization: Any, in_channels: int) -> Normalization | None:
    """Validate a ``(mean, std)`` pair and turn it into nested tuples of Python floats.

    Plain types keep the hyper-parameters loadable with ``torch.load(weights_only=True)``.
    """
    if normalization is None:
        return None
    try:
        mean, std = normalization
        mean = tuple(float(v) for v in mean)
        std = tuple(float(v) for v in std)
    except (TypeError, ValueError):
        raise ConfigurationError(
            f"normalization must be a pair (mean, std) of per-channel sequences, got {normalization!r}; "
            "e.g. [[0.4914, 0.4822, 0.4465], [0.2471, 0.2435, 0.2616]] for CIFAR-10."
        ) from None
    if len(mean) != in_channels or len(std) != in_channels:
        raise ConfigurationError(
            f"normalization needs {in_channels} means and stds (in_channels={in_channels}), got "
            f"{len(mean)} and {len(std)}; give one value per input channel."
        )
    if any(not (s > 0) or math.isinf(s) for s in std) or any(math.isnan(m) or math.isinf(m) for m in mean):
        raise ConfigurationError(
            f"normalization std must be finite and > 0 and mean finite, got {normalization!r}."
        )
    return mean, std


def checked_hyperparameters(hparams: Mapping[str, Any]) -> dict[str, Any]:
    """:class:`AdversarialClassifier`'s arguments checked (one line naming the problem and the fix) and turned
    into plain Python types; the threat model is checked by :class:`ThreatModel` itself."""
    get = hparams.get
    check_choice("objective", get("objective"), OBJECTIVES)
    check_choice("optimizer", get("optimizer"), OPTIMIZERS)
    num_classes = check_positive_int("num_classes", get("num_classes"), "e.g. 10 for CIFAR-10")
    if num_classes < 2:
        raise ConfigurationError(f"num_classes must be >= 2, got {num_classes}.")
    in_channels = check_positive_int("in_channels", get("in_channels"), "3 for RGB, 1 for grey images")
    # Checked for every objective: validation always runs PGD, even for standard training.
    threat = _threat_of(get)
    checked = {
        "backbone": str(get("backbone")),
        "num_classes": num_classes,
        "in_channels": in_channels,
        "objective": get("objective"),
        "threat": {"norm": threat.norm, "eps": threat.eps},
        "step_size": float(
            check_number("step_size", get("step_size"), minimum=0.0, strict=True, hint="paper: 0.0078")
        ),
        "attack_steps": check_positive_int("attack_steps", get("attack_steps"), "paper: 10 (PGD-10)"),
        "val_attack_steps": check_positive_int(
            "val_attack_steps", get("val_attack_steps"), "e.g. 10 (PGD-10)"
        ),
        "random_start": bool(get("random_start")),
        "trades_beta": check_number("trades_beta", get("trades_beta"), minimum=0.0, hint="paper A.5: 0.6"),
    }
    backbone_kwargs = get("backbone_kwargs")
    if backbone_kwargs is not None and not isinstance(backbone_kwargs, dict):
        raise ConfigurationError(f"backbone_kwargs must be a mapping, got {backbone_kwargs!r}.")
    return {
        **checked,
        "optimizer": get("optimizer"),
        **_checked_optimisation(get),
        **_checked_start(get),
        "backbone_kwargs": dict(backbone_kwargs or {}),
        "normalization": plain_normalization(get("normalization"), in_channels),
    }


def _checked_optimisation(get: Callable[[str], Any]) -> dict[str, Any]:
    """The optimiser's and the learning-rate schedule's arguments, checked."""
    milestones = [
        check_positive_int("lr_milestones entry", m, "epochs, e.g. [100, 150]") for m in get("lr_milestones")
    ]
    if milestones != sorted(set(milestones)):
        raise ConfigurationError(
            f"lr_milestones must be strictly increasing epochs, got {list(get('lr_milestones'))}."
        )
    return {
        "lr": check_number("lr", get("lr"), minimum=0.0, strict=True, hint="paper: 0.1 with SGD"),
        "momentum": check_number("momentum", get("momentum"), minimum=0.0, hint="paper: 0.9"),
        "weight_decay": check_number("weight_decay", get("weight_decay"), minimum=0.0, hint="paper: 5e-4"),
        "lr_milestones": tuple(milestones),
        "lr_gamma": check_number("lr_gamma", get("lr_gamma"), minimum=0.0, strict=True, hint="paper: 0.1"),
    }


def _checked_start(get: Callable[[str], Any]) -> dict[str, Any]:
    """Fine-tuning's arguments (the checkpoint to start from, its operators' alpha and backward), checked."""
    check_backward_mode(get("operator_backward"))
    init_checkpoint, operator_alpha = get("init_checkpoint"), get("operator_alpha")
    if operator_alpha is not None:
        operator_alpha = check_alpha(operator_alpha)
    if init_checkpoint is not None and not isinstance(init_checkpoint, str | os.PathLike):
        raise ConfigurationError(f"init_checkpoint must be a file path, got {init_checkpoint!r}.")
    if operator_alpha is not None and init_checkpoint is None:
        raise ConfigurationError(
            "operator_alpha sets the alpha of the operators of init_checkpoint; give init_checkpoint (a "
            "MeanSparse checkpoint) too, or leave operator_alpha out."
        )
    return {
        "init_checkpoint": None if init_checkpoint is None else str(init_checkpoint),
        "operator_alpha": operator_alpha,
        "operator_backward": get("operator_backward"),
    }


def _threat_of(get: Callable[[str], Any]) -> ThreatModel:
    """The training threat model: ``threat`` (a ThreatModel, or the plain dict a checkpoint stores), with the old
    ``norm`` / ``eps`` arguments applied over it (one ``deprecated:`` line; checkpoints written before store them)."""
    threat = get("threat")
    if isinstance(threat, Mapping):
        threat = ThreatModel(**threat)
    if threat is None:
        threat = ThreatModel()
    if not isinstance(threat, ThreatModel):
        raise ConfigurationError(f"threat must be a ThreatModel (norm, eps), got {threat!r}.")
    norm, eps = get("norm"), get("eps")
    if norm is None and eps is None:
        return threat
    deprecated("AdversarialClassifier's norm / eps are now threat.norm / threat.eps (--model.threat.*)")
    return ThreatModel(norm if norm is not None else threat.norm, eps if eps is not None else threat.eps)
