"""What the CLI subcommands share: the checks of their options (made before any data or model is loaded), which
model a checkpoint holds, which trained weights to load, which samples to use, and whether the data fit the
model. Kept apart from :mod:`meansparse_pl.trainer`, whose methods are the subcommands' option lists."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from torch import nn
from torch.utils.data import Dataset

from meansparse_pl.alpha_search import check_alphas
from meansparse_pl.attacks import check_attack_config
from meansparse_pl.calibration import check_input_shape, expected_input_shape
from meansparse_pl.checkpoint import load_checkpoint, load_model_or_weights, load_weights
from meansparse_pl.config import (
    AttackConfig,
    ComparedModel,
    DiagnosticsConfig,
    PlacementConfig,
    ThreatModel,
    check_alpha,
    check_distinct,
    check_number,
    check_optional_positive_int,
    check_positive_int,
)
from meansparse_pl.data import first_samples
from meansparse_pl.errors import CheckpointError, ConfigurationError, DataNotFoundError
from meansparse_pl.ops import alphas_of, operators, require_operators, set_alpha
from meansparse_pl.placement import get_preset
from meansparse_pl.report import COMPOSITE_ATTACKS
from meansparse_pl.robustbench import load_robustbench_weights
from meansparse_pl.robustness import Setting, model_setting


def _as(cls: type, value: Any) -> Any:
    """A config object from the value LightningCLI parsed: the object itself, or its fields (a Namespace or a
    dict), checked by the object's own constructor."""
    if value is None or isinstance(value, cls):
        return value
    fields = value.as_dict() if hasattr(value, "as_dict") else dict(value)
    return cls(**fields)


def _existing_file(name: str, value: Any) -> None:
    if value is None:
        return
    path = Path(value)
    if not path.is_file():
        raise DataNotFoundError(f"no {name} file at {path}; check the path (a directory or a typo?).")


def _writable_file(name: str, value: Any) -> None:
    if value is not None and Path(value).is_dir():
        raise ConfigurationError(f"{name} {value} is a directory; give a file name inside it.")


def check_options(subcommand: str, options: Mapping[str, Any]) -> None:
    """Every check of a MeanSparse subcommand's own options that needs no data and no model: attack names and
    options, threat model, alphas, batch sizes, limits, paths. ``cli.py`` runs it right after parsing, so a bad
    value is one line before anything is loaded; the subcommand itself runs it again on its arguments."""
    if subcommand not in ("postprocess", "alpha_search", "evaluate", "compare", "diagnose"):
        return
    get = options.get
    _as(DiagnosticsConfig, get("diagnostics"))
    check_positive_int("batch_size", get("batch_size", 1), "the number of images per attacked batch")
    check_optional_positive_int("limit_samples", get("limit_samples"), "or null for every sample")
    if subcommand == "postprocess":
        check_alpha(get("alpha", 0.0))
        placement = _as(PlacementConfig, get("placement"))
        if placement is not None and placement.strategy != "published":
            get_preset(placement.preset)
        _existing_file("checkpoint", get("checkpoint"))
        _writable_file("output", get("output"))
        if not get("checkpoint") and not get("allow_untrained", False):
            raise ConfigurationError(
                "postprocess needs trained weights and got no --checkpoint, so it would sparsify a randomly "
                "initialised network; give --checkpoint (a Lightning checkpoint or a state dict of the network), or "
                "--allow_untrained true to sparsify the untrained network on purpose."
            )
        return
    if subcommand == "compare":
        _check_compared(get("models"), get("control"))
    _existing_file("checkpoint", get("checkpoint"))
    threat = _as(ThreatModel, get("threat")) or ThreatModel()
    attacks = _as(AttackConfig, get("attacks"))
    if subcommand == "alpha_search":
        check_alphas(get("alphas", [0.0]))
        check_number("max_clean_drop", get("max_clean_drop", 0.5), minimum=0.0, hint="in points")
        if attacks is not None:
            check_attack_config(attacks)
        return
    if attacks is not None:
        check_attack_config(attacks, COMPOSITE_ATTACKS)
    check_distinct("eps", [threat.eps, *(threat.with_eps(eps).eps for eps in get("extra_eps") or [])])
    if get("large_eps") is not None:
        threat.with_eps(get("large_eps"))
    if get("alpha") is not None:
        check_alpha(get("alpha"))
    site = get("histogram_site")
    if site is not None and (isinstance(site, bool) or not isinstance(site, int) or site < 0):
        raise ConfigurationError(f"histogram_site must be an operator site index >= 0, got {site!r}.")


def _check_compared(models: Any, control: Any) -> None:
    entries = [_as(ComparedModel, m) for m in models or []]
    if len(entries) < 2:
        raise ConfigurationError(
            "compare needs at least two models (a control and one to compare with it), each as "
            "{label: ..., checkpoint: ...}."
        )
    labels = [m.label for m in entries]
    if len(set(labels)) != len(labels):
        raise ConfigurationError(f"compared model labels must be unique, got {labels}.")
    if control not in labels:
        raise ConfigurationError(
            f"control {control!r} is not one of the compared models' labels {labels}; name the equal-budget "
            "control's label."
        )
    for m in entries:
        _existing_file(f"{m.label} checkpoint", m.checkpoint)


def calibrated_model(checkpoint: str, network: nn.Module | None, fallback: nn.Module | None) -> nn.Module:
    """The sparsified model of ``checkpoint`` (built on ``network`` when one is given); every operator must carry
    statistics."""
    sparse = load_checkpoint(checkpoint, network, fallback_model=fallback)
    if not all(op.is_calibrated for op in require_operators(sparse)):
        raise CheckpointError(
            f"{checkpoint} has uncalibrated MeanSparse operators; run `cli.py postprocess` on it first."
        )
    return sparse


def split_samples(datamodule: Any, split: str, limit: int | None) -> Dataset:
    """The first ``limit`` samples of the datamodule's test split, or of its held-out validation split."""
    datamodule.setup("test" if split == "test" else "fit")
    loader = datamodule.test_dataloader() if split == "test" else datamodule.val_dataloader()
    return first_samples(loader.dataset, limit)


def compared_model(entry: ComparedModel, network: nn.Module | None, fallback: nn.Module | None) -> nn.Module:
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
    if operators(loaded) and not all(op.is_calibrated for op in operators(loaded)):
        raise CheckpointError(
            f"{entry.checkpoint} has uncalibrated MeanSparse operators; run `cli.py postprocess` on it first."
        )
    if entry.alpha is not None:
        if operators(loaded):
            set_alpha(loaded, entry.alpha)
        elif entry.alpha != 0:
            raise ConfigurationError(
                f"{entry.label}: alpha {entry.alpha:g} given, but {entry.checkpoint} has no MeanSparse operators; "
                "give a MeanSparse checkpoint or leave alpha out."
            )
    return loaded


def operator_setting(model: nn.Module) -> str:
    """How a compared model's operators are set, for the report's column heads."""
    if not operators(model):
        return "no operators"
    values = alphas_of(model)
    if len(set(values)) > 1:
        return "alpha per operator"
    return f"alpha {values[0]:g}"


def check_data_fits(model: nn.Module, dataset: Dataset, datamodule: Any, checkpoint: str) -> None:
    """One error naming both shapes when the data's images are not of the shape the operators were placed for
    (a 1-channel checkpoint and CIFAR data, say), instead of a convolution's traceback."""
    if len(dataset) == 0:  # type: ignore[arg-type]
        return
    image = dataset[0][0]
    where = f"the data module {type(datamodule).__name__} and the checkpoint {checkpoint} do not fit"
    check_input_shape(expected_input_shape(model), image[None], where)


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


def evaluated_variants(sparse: nn.Module, alpha: float | None, compare_base: bool) -> dict[str, Setting]:
    """The variants ``evaluate`` / ``diagnose`` run: the MeanSparse setting (``alpha``, else the checkpoint's own)
    and, with ``compare_base``, the base model (alpha 0) unless that is the same."""
    setting = check_alpha(alpha) if alpha is not None else model_setting(sparse)
    variants: dict[str, Setting] = {"meansparse": setting}
    if compare_base and (isinstance(setting, tuple) or setting != 0):
        variants["base"] = 0.0
    return variants
