"""Import and export the published MeanSparse models (Amini et al., 2024; RobustBench ``Amini2024MeanSparse_*``).

The released models carry their own MeanSparse module class. Every instance holds the buffers
``running_mean [C]``, ``running_var [C]``, ``threshold`` (a scalar: alpha), ``flag_update_statistics`` and
``batch_num``; the ImageNet variant (``MeanSparse_imagenet``) adds two unused buffers ``momentum`` and
``epsilon`` and decides the layout of every call by testing ``x.shape[1] == C``. Its forward is the identity
when ``threshold == 0`` and ``torch.where(|x - mean| < threshold * sqrt(var), mean, x)`` otherwise, which is
exactly :class:`~meansparse_pl.operator.MeanSparse`'s forward, so a converted model reproduces the published
logits bit for bit, and gains what the published class lacks: the straight-through (BPDA) backward, alpha
search, calibration and the reports.

Two ways in, one way out:

* :func:`convert_published` swaps the published modules of a model object (e.g. one built by RobustBench's
  model zoo) for this package's operators, in place, at the same module paths (placement strategy
  ``published``, :mod:`meansparse_pl.placement.published_sites`), so
  :func:`~meansparse_pl.checkpoint.save_checkpoint` / ``load_checkpoint`` rebuild it on a fresh instance of
  the published architecture.
* :func:`load_published_state_dict` loads a published *state dict* into a model sparsified with one of the
  ``published_*`` placement presets on the base architecture (no published module class needed): each
  operator's published key prefix is derived from its site (``docs/published_models.md`` lists them).
* :func:`published_state_dict` writes a sparsified model back in the published buffer format.

Statistics are kept as published: the published calibration added ``mean(x) / batch_num`` and
``var(x) / batch_num`` for every batch, so ``running_var`` is an *average of per-batch unbiased variances*
(smaller than the population variance by the spread of the batch means), not the population variance this
package's :func:`~meansparse_pl.calibrate` computes. Re-calibrating a converted model therefore changes its
thresholds slightly; do it only on purpose. The element count behind published statistics is unknown: an
imported operator gets ``count = 1`` (calibrated, count unknown).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from meansparse_pl.config import PlacementConfig, placement_config
from meansparse_pl.errors import CheckpointError, ConfigurationError, StatisticsError
from meansparse_pl.io import load_error_detail
from meansparse_pl.ops import BackwardMode, MeanSparse
from meansparse_pl.placement import Placement, Site, placement_of, sparsify
from meansparse_pl.placement.published_sites import (
    IMAGENET,
    IMAGENET_BUFFERS,
    IMAGENET_DEFAULTS,
    PLAIN,
    PUBLISHED_BUFFERS,
    find_published_modules,
    is_published_module,
)

__all__ = [
    "IMAGENET_BUFFERS",
    "PUBLISHED_BUFFERS",
    "convert_published",
    "find_published_modules",
    "is_published_module",
    "load_published_state_dict",
    "published_names",
    "published_state_dict",
]


def convert_published(
    model: nn.Module,
    example_input: torch.Tensor | Sequence[int],
    config: PlacementConfig | None = None,
    *,
    backward_mode: BackwardMode = "exact",
    **options: Any,
) -> nn.Module:
    """Swap the published MeanSparse modules of ``model`` for this package's operators, in place.

    Args:
        model: a model containing published-style MeanSparse modules (with their statistics loaded).
        example_input: a batch of the input size the model is used at (or a shape without the batch dim).
            A probe forward records each module's input layout, because the published ImageNet class decides
            its layout at run time from the input shape.
        config: the same :class:`~meansparse_pl.config.PlacementConfig` as ``sparsify`` takes (``options``
            replace its fields): ``include`` / ``exclude`` / ``sites`` convert only some modules (the others
            keep working as published modules), ``centre`` the band centre (the published forward uses
            ``channel_mean``), ``channel_dims`` overrides the probe's layout rule. Its strategy must be
            ``auto`` or ``published``; its preset is not used (the published modules are the sites).
        backward_mode: the operators' backward (the published forward is ``exact``).

    Returns the same model object with a placement record (strategy ``published``): alpha is each module's
    ``threshold``, statistics are its ``running_mean`` / ``running_var``, unchanged.
    """
    config = placement_config(config, **options)
    if config.strategy not in ("auto", "published"):
        raise ConfigurationError(
            f"convert_published swaps the published modules (strategy 'published'), got strategy "
            f"{config.strategy!r}; use sparsify for the other strategies."
        )
    return sparsify(
        model, example_input, placement_config(config, strategy="published"), backward_mode=backward_mode
    )


# ------------------------------------------------------------------------------------- published names
def _join(parent: str, leaf: str) -> str:
    return f"{parent}.{leaf}" if parent else leaf


def _wrn_name(site: Site, ordinal: int) -> str | None:
    """DeepMind / RobustArch WideResNet blocks: ``relu_k`` -> ``meansparse_k``, the block's residual sum ->
    ``meansparse_2``, the final ``relu`` -> ``meansparse_end``."""
    parent, _, leaf = site.module_path.rpartition(".")
    if site.kind == "activation":
        match = re.fullmatch(r"relu_(\d+)", leaf)
        if match:
            return _join(parent, f"meansparse_{match[1]}")
        if leaf == "relu":
            return _join(parent, "meansparse_end")
    elif site.kind == "residual_add" and ordinal == 0:
        return _join(site.module_path, "meansparse_2")
    return None


def _convnext_name(site: Site, ordinal: int) -> str | None:
    """robustbench's ``add_custom_layer_imagenet``: ``act`` -> ``Sequential(MeanSparse, act)`` and
    ``drop_path`` -> ``Sequential(drop_path, MeanSparse)``."""
    if site.kind == "activation" and site.module_path.endswith("mlp.act"):
        return f"{site.module_path}.0"
    if site.kind == "after_module" and site.module_path.endswith("drop_path"):
        return f"{site.module_path}.1"
    return None


def _swin_name(site: Site, ordinal: int) -> str | None:
    """The released Swin: ``mlp.meansparse1`` (before GELU), ``mlp.meansparse2`` (after fc2), and the
    block's ``meansparse1`` / ``meansparse2`` after its first / second residual sum."""
    parent = site.module_path.rpartition(".")[0]
    if site.kind == "activation" and site.module_path.endswith("mlp.act"):
        return f"{parent}.meansparse1"
    if site.kind == "after_module" and site.module_path.endswith("mlp.fc2"):
        return f"{parent}.meansparse2"
    if site.kind == "residual_add" and ordinal in (0, 1):
        return _join(site.module_path, f"meansparse{ordinal + 1}")
    return None


# preset -> (name rule, published class variant)
_NAME_RULES: dict[str, tuple[Callable[[Site, int], str | None], str]] = {
    "published_wrn": (_wrn_name, PLAIN),
    "published_convnext": (_convnext_name, IMAGENET),
    "published_swin": (_swin_name, PLAIN),
}


def published_names(model: nn.Module) -> dict[str, tuple[str, str]]:
    """``{operator path in model: (published module path, published class variant)}`` for every operator.

    For strategy ``published`` the operators sit at the published paths already; for a ``published_*``
    preset the path follows from each site (the residual sums of one module are numbered in forward order,
    so the placement must be complete: no include / exclude / site subset).
    """
    placement: Placement = placement_of(model)
    if placement.strategy == "published":
        return {s.operator_name: (s.operator_name, s.call) for s in placement.sites}
    config = placement.config
    rule = _NAME_RULES.get(config.preset)
    if rule is None:
        raise CheckpointError(
            f"the model was sparsified with preset {config.preset!r}, which has no published "
            f"counterpart; use one of {', '.join(_NAME_RULES)} (or convert_published on a published model)."
        )
    if config.include or config.exclude or config.sites is not None:
        raise CheckpointError(
            "published names need the complete preset placement; the model was sparsified with include / "
            "exclude / sites rules."
        )
    name_of, variant = rule
    ordinals: dict[str, int] = {}
    names: dict[str, tuple[str, str]] = {}
    for site in placement.sites:
        ordinal = ordinals.get(site.module_path, 0) if site.kind == "residual_add" else 0
        if site.kind == "residual_add":
            ordinals[site.module_path] = ordinal + 1
        name = name_of(site, ordinal)
        if name is None:
            raise CheckpointError(
                f"{site.label} has no counterpart in the published {config.preset} layout; is this "
                "the architecture the published model was built on?"
            )
        names[site.operator_name] = (name, variant)
    return names


# --------------------------------------------------------------------------------------- import / export
def load_published_state_dict(
    model: nn.Module, state_dict: Mapping[str, torch.Tensor], *, strict: bool = True
) -> nn.Module:
    """Load a published state dict (``...running_mean`` etc.) into a sparsified model.

    ``model`` carries this package's operators at the published sites: a ``published_*`` preset placement
    on the base architecture, or a :func:`convert_published` model. Weights load under their own names;
    each published module's buffers become its operator's ``mean`` / ``var`` / ``alpha`` (``count = 1``).
    Published modules without an operator, and operators without published buffers, are errors: either
    means the placement does not match the published model.
    """
    names = published_names(model)
    state = dict(state_dict)
    ours: dict[str, torch.Tensor] = {}
    consumed: set[str] = set()
    for op_path, (prefix, _variant) in names.items():
        keys = {b: f"{prefix}.{b}" for b in PUBLISHED_BUFFERS}
        missing = [k for k in keys.values() if k not in state]
        if missing:
            raise CheckpointError(
                f"the published state dict has no {missing[0]} for operator {op_path}; the state dict does "
                "not belong to this published architecture."
            )
        if int(state[keys["flag_update_statistics"]]) != 0:
            raise StatisticsError(
                f"{prefix} was saved with flag_update_statistics set (calibration unfinished)."
            )
        mean, var = state[keys["running_mean"]], state[keys["running_var"]]
        calibrated = bool(float(state[keys["batch_num"]]) > 0 or mean.any() or var.any())
        ours[f"{op_path}.mean"] = mean
        ours[f"{op_path}.var"] = var
        ours[f"{op_path}.alpha"] = state[keys["threshold"]].reshape(())
        ours[f"{op_path}.count"] = torch.tensor(int(calibrated), dtype=torch.int64)
        consumed.update(keys.values())
        consumed.update(f"{prefix}.{b}" for b in IMAGENET_BUFFERS if f"{prefix}.{b}" in state)
    stray = [
        k[: -len(".flag_update_statistics")]
        for k in state
        if k.endswith(".flag_update_statistics") and k not in consumed
    ]
    if stray:
        raise CheckpointError(
            f"{len(stray)} published MeanSparse module(s) have no operator in this placement (first: "
            f"{stray[0]}); sparsify the model with the matching published preset."
        )
    ours.update({k: v for k, v in state.items() if k not in consumed})
    own = model.state_dict()
    for key in getattr(model, "meansparse_fx_constants", ()):
        # constants fx turned into buffers are not in the published state dict; keep the model's own
        ours.setdefault(key, own[key])
    try:
        model.load_state_dict(ours, strict=strict)
    except RuntimeError as error:
        raise CheckpointError(
            f"the published weights do not fit the model ({load_error_detail(error)})."
        ) from error
    return model


def published_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict in the published format: every operator as the published module's buffers.

    ``flag_update_statistics`` is written as 0 and ``batch_num`` as 1 for calibrated operators (0 otherwise):
    the published statistics are final averages, ``batch_num`` only divides the updates of a new published
    calibration pass. Tensors fx copied into a GraphModule (see ``meansparse_fx_constants``) are left out.
    """
    names = published_names(model)
    state = model.state_dict()
    skip = set(getattr(model, "meansparse_fx_constants", ()))
    out: dict[str, Any] = {}
    for op_path, (prefix, variant) in names.items():
        op = model.get_submodule(op_path)
        if not isinstance(op, MeanSparse):
            raise CheckpointError(f"{op_path} is not a MeanSparse operator.")
        out[f"{prefix}.running_mean"] = op.mean.detach().clone()
        out[f"{prefix}.running_var"] = op.var.detach().clone()
        out[f"{prefix}.threshold"] = op.alpha.detach().clone()
        out[f"{prefix}.flag_update_statistics"] = torch.tensor(0)
        out[f"{prefix}.batch_num"] = torch.tensor(1.0 if op.is_calibrated else 0.0)
        if variant == IMAGENET:
            for name, value in IMAGENET_DEFAULTS.items():
                out[f"{prefix}.{name}"] = torch.tensor(value)
        skip.update(f"{op_path}.{b}" for b in ("mean", "var", "alpha", "count"))
    for key, value in state.items():
        if key not in skip:
            out[key] = value
    return out
