"""Find every site of a placement rule and put a MeanSparse operator there: ``sparsify``, ``sparsify_like``,
``find_sites`` and ``describe``, all driven by one :class:`~meansparse_pl.config.PlacementConfig`.

Like torch.ao.quantization's eager and fx modes, the strategies live in their own modules
(:mod:`.fx`, :mod:`.hooks`, :mod:`.published_sites`); this module chooses one, selects the sites the
configuration asks for and records what was done (:class:`~.record.Placement`).

The channel axis of each site is decided from a probe forward: ``(N, C, ...)`` conv features use dim 1,
``(N, L, C)`` tokens and ``(N, H, W, C)`` channels-last MLP features use the last dim.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from meansparse_pl.config import PlacementConfig, check_alpha, placement_config
from meansparse_pl.errors import ConfigurationError, PlacementError
from meansparse_pl.ops import BackwardMode, MeanSparse, operators
from meansparse_pl.placement import fx as fx_strategy
from meansparse_pl.placement import hooks as hook_strategy
from meansparse_pl.placement import published_sites
from meansparse_pl.placement.layout import prepare_input
from meansparse_pl.placement.record import Placement, Site, placement_of
from meansparse_pl.placement.registry import get_preset


def _select(sites: list[Site], config: PlacementConfig) -> list[Site]:
    if not sites:
        raise PlacementError(
            "no activation found in the model (modules, functional calls and Tensor methods were searched); "
            "register a custom activation with meansparse_pl.register_activation(MyActivation)."
        )
    selected = sites
    if config.include:
        for pattern in config.include:
            if not any(fnmatch.fnmatchcase(s.module_path, pattern) for s in sites):
                raise PlacementError(
                    f"include pattern {pattern!r} matches no activation site; run "
                    "meansparse_pl.find_sites(model, example_input) to see the module paths."
                )
        selected = [s for s in selected if any(fnmatch.fnmatchcase(s.module_path, p) for p in config.include)]
    # every rule must match something: a pattern that matches nothing is a typo or a path of another library's
    # layout (a torchvision SE block is features.1.0.block.1, not *.se), and would silently change nothing
    rules = [("exclude pattern", p) for p in config.exclude or ()]
    rules += [("channel_dims pattern", p) for p in (config.channel_dims or {})]
    for kind, pattern in rules:
        if not any(fnmatch.fnmatchcase(s.module_path, pattern) for s in sites):
            raise PlacementError(
                f"{kind} {pattern!r} matches no activation site; run meansparse_pl.find_sites(model, "
                "example_input) to see the module paths."
            )
    if config.exclude:
        selected = [
            s for s in selected if not any(fnmatch.fnmatchcase(s.module_path, p) for p in config.exclude)
        ]
    if config.sites is not None:
        bad = [i for i in config.sites if not 0 <= i < len(sites)]
        if bad:
            raise PlacementError(
                f"site indices {bad} out of range: the model has {len(sites)} activation sites."
            )
        wanted = set(config.sites)
        selected = [s for s in selected if s.index in wanted]
    if not selected:
        raise PlacementError("the include / exclude / site rules leave no activation site to sparsify.")
    return selected


def _candidates(
    model: nn.Module, x: torch.Tensor, config: PlacementConfig
) -> tuple[str, list[tuple[Site, Any]], fx.GraphModule | None]:
    """The strategy used, every candidate site with its handle (fx node, module or path), and the graph."""
    if config.strategy == "published":
        return "published", published_sites.candidate_sites(model, x, config.channel_dims), None
    preset = get_preset(config.preset)
    only_activations = preset.name == "activations"
    if config.strategy == "hooks" and not only_activations:
        raise PlacementError(
            f"preset {preset.name!r} places operators after residual sums / modules, which only the fx "
            "strategy can reach; use strategy='auto' or 'fx'."
        )
    trace_error = "not tried"
    if config.strategy in ("auto", "fx"):
        try:
            gm = fx_strategy.trace(model, [*config.leaf_modules, *preset.after_modules])
        except Exception as error:  # fx raises many types (TraceError, TypeError, AttributeError, ...)
            trace_error = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
            if config.strategy == "fx" or not only_activations:
                raise PlacementError(
                    f"torch.fx cannot trace this model ({trace_error}); list the untraceable submodule in "
                    "leaf_modules=[...]"
                    + (
                        " or use strategy='hooks'."
                        if only_activations
                        else f" (preset {preset.name!r} needs fx)."
                    )
                ) from error
        else:
            if only_activations:
                return "fx", fx_strategy.activation_sites(gm, x, config.channel_dims), gm
            return "fx", fx_strategy.preset_sites(gm, x, config.channel_dims, preset), gm
    return "hooks", hook_strategy.activation_sites(model, x, config.channel_dims, trace_error), None


def find_sites(
    model: nn.Module,
    example_input: torch.Tensor | Sequence[int],
    config: PlacementConfig | None = None,
    **options: Any,
) -> list[Site]:
    """Every site of the configuration's rule (default: every activation call) in forward order, without
    changing the model; ``options`` replace fields of ``config`` (see :class:`PlacementConfig`)."""
    config = placement_config(config, **options)
    x = prepare_input(model, example_input)
    return [site for site, _ in _candidates(model, x, config)[1]]


def sparsify(
    model: nn.Module,
    example_input: torch.Tensor | Sequence[int],
    config: PlacementConfig | None = None,
    *,
    alpha: float = 0.0,
    backward_mode: BackwardMode = "exact",
    **options: Any,
) -> nn.Module:
    """Insert a MeanSparse operator at every site the placement configuration selects (by default: before
    every activation call).

    Args:
        model: any classifier; it is not copied: with the ``fx`` strategy the returned GraphModule shares its
            parameters, with ``hooks`` and ``published`` the model itself is modified and returned.
        example_input: a batch (or a shape without the batch dim) for the probe forward that finds the
            sites and their channel layout.
        config: where the operators go (:class:`~meansparse_pl.config.PlacementConfig`); default: the paper's
            rule. ``options`` (any of its field names, e.g. ``exclude=["*.se.*"]``) replace its fields.
        alpha, backward_mode: operator settings, see :class:`~meansparse_pl.ops.MeanSparse`. With strategy
            ``published`` each operator takes its published module's threshold instead of ``alpha``.

    The operators are uncalibrated: run :func:`meansparse_pl.calibrate` before using the model.
    """
    config = placement_config(config, **options)
    check_alpha(alpha)
    if operators(model):
        raise PlacementError("the model already has MeanSparse operators; sparsify a model only once.")
    x = prepare_input(model, example_input)
    source_keys = set(model.state_dict())
    used, candidates, gm = _candidates(model, x, config)
    chosen = {s.index for s in _select([s for s, _ in candidates], config)}

    def make_operator(site: Site) -> tuple[MeanSparse, Site]:
        # on the model's device (where the probe input was put): the buffers must live next to the features
        op = MeanSparse(site.num_channels, site.channel_dim, alpha, config.centre, backward_mode).to(x.device)
        op.site_name = site.label
        return op, replace(site, operator_name=site.operator_name or f"meansparse_{site.index}")

    fx_constants: tuple[str, ...] = ()
    carried: dict[str, Any] = {}
    if used == "published":
        placed = published_sites.insert_operators(model, candidates, chosen, make_operator)
        result: nn.Module = model
    elif used == "fx":
        assert gm is not None
        # Tensors fx copies into the GraphModule as buffers (non-persistent buffers, plain tensor attributes)
        # appear in its state dict but not in the model's; exports to other formats leave them out.
        fx_constants = tuple(sorted(set(gm.state_dict()) - source_keys))
        placed = fx_strategy.insert_operators(gm, candidates, chosen, make_operator, config.fuse_activations)
        fx_strategy.readable_asserts(gm, tuple(x.shape[1:]))
        result = gm
        carried = _public_data(model, gm)
    else:
        placed = hook_strategy.insert_operators(model, candidates, chosen, make_operator)
        result = model
    placement = Placement(replace(config, strategy=used), tuple(x.shape[1:]), placed)
    result.meansparse_placement = placement
    result.meansparse_fx_constants = fx_constants
    if isinstance(result, fx.GraphModule):
        # GraphModule.__deepcopy__ rebuilds the module from its graph and keeps only the attributes listed here
        preserved = result.meta.setdefault("_user_preserved_attributes", {})
        preserved["meansparse_placement"] = placement
        preserved["meansparse_fx_constants"] = fx_constants
        for name, value in carried.items():
            setattr(result, name, value)
            preserved[name] = value
    return result


def _public_data(model: nn.Module, gm: fx.GraphModule) -> dict[str, Any]:
    """The original model's public plain attributes (timm's ``num_classes``, ``pretrained_cfg``, ``num_features``,
    ...) that the GraphModule fx built does not carry. Methods other than ``forward`` are not carried: run on the
    sparsified model's modules they would bypass the operators, which live in the traced forward only."""
    return {
        name: value
        for name, value in vars(model).items()
        if not name.startswith("_")
        and name != "training"
        and not callable(value)
        and not isinstance(value, nn.Module | torch.Tensor)
        and not hasattr(gm, name)
    }


def sparsify_like(model: nn.Module, placement: Placement) -> nn.Module:
    """Rebuild the operators a placement record describes on a fresh instance of the same architecture.

    This is what loading a checkpoint does: the record's configuration goes back into :func:`sparsify` whole,
    so the same sites (and site indices) come back. Statistics and alpha are not in the record: load them with
    ``load_state_dict`` afterwards.
    """
    if not isinstance(placement, Placement):
        raise ConfigurationError(f"sparsify_like takes a Placement record, got {type(placement).__name__}.")
    return sparsify(model, placement.input_shape, placement.config)


def describe(model: nn.Module) -> str:
    """A Markdown table of every operator: index, module path, call, channel axis, channels, state."""
    placement = placement_of(model)
    # by label, not by attribute name: hook placement keeps the operators in `<activation>.meansparse.ops.<k>`
    by_label = {op.site_name: op for op in operators(model)}
    rows = [
        f"Placement: {placement.strategy}, {len(placement.sites)} operators, input {placement.input_shape}",
        "",
        "| site | module | call | channel dim | channels | input shape | alpha | calibrated |",
        "|---:|---|---|---:|---:|---|---:|---|",
    ]
    for site in placement.sites:
        op = by_label.get(site.label)
        alpha = f"{float(op.alpha):g}" if op is not None else "?"
        calibrated = "yes" if op is not None and op.is_calibrated else "no"
        rows.append(
            f"| {site.index} | {site.module_path or '(root)'} | {site.call}"
            f"{' (fused)' if site.fused_activation else ''} | {site.channel_dim} | "
            f"{site.num_channels} | {tuple(site.input_shape)} | {alpha} | {calibrated} |"
        )
    return "\n".join(rows)
