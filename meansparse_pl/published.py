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
  model zoo) for this package's operators, in place, at the same module paths. The placement is recorded as
  strategy ``published``, so :func:`~meansparse_pl.checkpoint.save_checkpoint` / ``load_checkpoint`` rebuild
  it on a fresh instance of the published architecture.
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

import fnmatch
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from meansparse_pl.checkpoint import load_error_detail
from meansparse_pl.errors import CheckpointError, PlacementError, StatisticsError
from meansparse_pl.operator import BackwardMode, Centre, MeanSparse
from meansparse_pl.placement import Placement, Site, _probe_mode, _site_label, placement_of, sparsify

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

PUBLISHED_BUFFERS: tuple[str, ...] = (
    "running_mean",
    "running_var",
    "threshold",
    "flag_update_statistics",
    "batch_num",
)
IMAGENET_BUFFERS: tuple[str, ...] = ("momentum", "epsilon")
PLAIN = "MeanSparse"  # the CIFAR / Swin class
IMAGENET = "MeanSparse_imagenet"
# the values the published ImageNet class initialises its two unused buffers with
_IMAGENET_DEFAULTS = {"momentum": 0.1, "epsilon": 1.0e-10}


# ------------------------------------------------------------------------------------ published modules
def is_published_module(module: nn.Module) -> bool:
    """Whether ``module`` is a published-style MeanSparse module (recognised by its buffers, not its class,
    because every released architecture file defines its own copy of the class)."""
    names = set(dict(module.named_buffers(recurse=False)))
    return (
        set(PUBLISHED_BUFFERS) <= names
        and names <= set(PUBLISHED_BUFFERS) | set(IMAGENET_BUFFERS)
        and not any(True for _ in module.parameters(recurse=False))
        and not any(True for _ in module.children())
        and module.running_mean.dim() == 1
    )


def _variant(module: nn.Module) -> str:
    names = set(dict(module.named_buffers(recurse=False)))
    return IMAGENET if set(IMAGENET_BUFFERS) <= names else PLAIN


def find_published_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(path, module)`` of every published-style MeanSparse module, in registration order."""
    return [(path, m) for path, m in model.named_modules() if path and is_published_module(m)]


def _has_statistics(module: nn.Module) -> bool:
    """A published module never calibrated holds zeros (and ``batch_num == 0``): it is not calibrated."""
    return bool(float(module.batch_num) > 0 or module.running_mean.any() or module.running_var.any())


def _published_layout(variant: str, shape: tuple[int, ...], channels: int) -> int:
    """The channel axis the published forward uses for an input of ``shape``.

    The CIFAR class reduces over ``(0, 2, 3)``; the Swin class over ``(0, 1)`` of ``(B, L, C)`` tokens; the
    ImageNet class picks ``(N, C, H, W)`` when ``x.shape[1] == C`` and ``(N, H, W, C)`` otherwise.
    """
    if len(shape) <= 2:
        return 1
    if len(shape) == 3:
        return -1
    if variant == IMAGENET and shape[1] != channels:
        return -1
    return 1


def published_candidate_sites(
    model: nn.Module, example_input: torch.Tensor, channel_dims: dict[str, int] | None
) -> list[tuple[Site, str]]:
    """Sites of placement strategy ``published``: every published module, in the order a probe forward calls
    them, with the layout the published forward would use for that input."""
    modules = find_published_modules(model)
    if not modules:
        raise PlacementError(
            "strategy 'published' found no published-style MeanSparse module (buffers running_mean, "
            "running_var, threshold, flag_update_statistics, batch_num) in the model."
        )
    collecting = [path for path, m in modules if int(m.flag_update_statistics) != 0]
    if collecting:
        raise StatisticsError(
            f"published module {collecting[0]} still has flag_update_statistics set, so every forward would "
            "change its statistics; set the flag to 0 (finish the published calibration) before converting."
        )
    calls: list[tuple[str, nn.Module, tuple[int, ...]]] = []
    handles = []
    for path, module in modules:

        def record(m: nn.Module, args: tuple, path: str = path) -> None:
            calls.append((path, m, tuple(args[0].shape)))

        handles.append(module.register_forward_pre_hook(record))
    try:
        with _probe_mode(model), torch.no_grad():
            model(example_input)
    finally:
        for handle in handles:
            handle.remove()
    paths = [path for path, _, _ in calls]
    repeated = next((p for p in paths if paths.count(p) > 1), None)
    if repeated is not None:
        raise PlacementError(
            f"published module {repeated} is called more than once per forward; one operator per module "
            "cannot reproduce it."
        )
    never = [path for path, _ in modules if path not in paths]
    if never:
        raise PlacementError(
            f"published module {never[0]} is not called by a forward with input shape "
            f"{tuple(example_input.shape)}; give an input the model really uses."
        )
    found: list[tuple[Site, str]] = []
    for path, module, shape in calls:
        channels = int(module.running_mean.numel())
        variant = _variant(module)
        dim = next(
            (d for pattern, d in (channel_dims or {}).items() if fnmatch.fnmatchcase(path, pattern)),
            _published_layout(variant, shape, channels),
        )
        if shape[dim] != channels:
            raise PlacementError(
                f"published module {path} has {channels} channels but its input {shape} has {shape[dim]} on "
                f"dim {dim}; pass channel_dims={{{path!r}: <axis>}}."
            )
        found.append((Site(len(found), path, variant, shape, dim, channels, path, kind="published"), path))
    return found


def install_published_operators(
    model: nn.Module,
    candidates: Sequence[tuple[Site, str]],
    chosen: set[int],
    centre: Centre,
    backward_mode: BackwardMode,
) -> nn.Module:
    """Replace each chosen published module by a :class:`MeanSparse` holding its statistics and threshold."""
    for site, path in candidates:
        if site.index not in chosen:
            continue
        old = model.get_submodule(path)
        op = MeanSparse(site.num_channels, site.channel_dim, float(old.threshold), centre, backward_mode).to(
            device=old.running_mean.device, dtype=old.running_mean.dtype
        )
        op.site_name = _site_label(site)
        if _has_statistics(old):
            op.set_statistics(old.running_mean, old.running_var, count=1)
        parent_path, _, name = path.rpartition(".")
        setattr(model.get_submodule(parent_path) if parent_path else model, name, op)
    return model


def convert_published(
    model: nn.Module,
    example_input: torch.Tensor | Sequence[int],
    *,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    sites: Sequence[int] | None = None,
    centre: Centre = "channel_mean",
    backward_mode: BackwardMode = "exact",
    channel_dims: dict[str, int] | None = None,
) -> nn.Module:
    """Swap the published MeanSparse modules of ``model`` for this package's operators, in place.

    Args:
        model: a model containing published-style MeanSparse modules (with their statistics loaded).
        example_input: a batch of the input size the model is used at (or a shape without the batch dim).
            A probe forward records each module's input layout, because the published ImageNet class decides
            its layout at run time from the input shape.
        include / exclude / sites: convert only some modules (the others keep working as published modules).
        centre / backward_mode: operator settings (the published forward is ``channel_mean`` / ``exact``).
        channel_dims: fnmatch pattern on module paths -> channel axis, if the probe rule must be overridden.

    Returns the same model object with a placement record (strategy ``published``): alpha is each module's
    ``threshold``, statistics are its ``running_mean`` / ``running_var``, unchanged.
    """
    return sparsify(
        model,
        example_input,
        include=include,
        exclude=exclude,
        sites=sites,
        centre=centre,
        backward_mode=backward_mode,
        strategy="published",
        channel_dims=channel_dims,
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
    rule = _NAME_RULES.get(placement.preset)
    if rule is None:
        raise CheckpointError(
            f"the model was sparsified with preset {placement.preset!r}, which has no published "
            f"counterpart; use one of {', '.join(_NAME_RULES)} (or convert_published on a published model)."
        )
    if placement.include or placement.exclude or placement.site_indices is not None:
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
                f"{_site_label(site)} has no counterpart in the published {placement.preset} layout; is this "
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
            for name, value in _IMAGENET_DEFAULTS.items():
                out[f"{prefix}.{name}"] = torch.tensor(value)
        skip.update(f"{op_path}.{b}" for b in ("mean", "var", "alpha", "count"))
    for key, value in state.items():
        if key not in skip:
            out[key] = value
    return out
