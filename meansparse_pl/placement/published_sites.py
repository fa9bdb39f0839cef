"""Placement strategy ``published``: the published-style MeanSparse modules a model already contains become
this package's operators, at the same module paths, with their statistics and threshold.

The released models carry their own MeanSparse module class. Every instance holds the buffers ``running_mean
[C]``, ``running_var [C]``, ``threshold`` (a scalar: alpha), ``flag_update_statistics`` and ``batch_num``; the
ImageNet variant (``MeanSparse_imagenet``) adds two unused buffers ``momentum`` and ``epsilon`` and decides the
layout of every call by testing ``x.shape[1] == C``. Import and export of published state dicts are in
:mod:`meansparse_pl.published`.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Sequence

import torch
from torch import nn

from meansparse_pl.errors import PlacementError, StatisticsError
from meansparse_pl.ops import MeanSparse
from meansparse_pl.placement.layout import probing
from meansparse_pl.placement.record import Site

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
IMAGENET_DEFAULTS = {"momentum": 0.1, "epsilon": 1.0e-10}


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


def variant_of(module: nn.Module) -> str:
    names = set(dict(module.named_buffers(recurse=False)))
    return IMAGENET if set(IMAGENET_BUFFERS) <= names else PLAIN


def find_published_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(path, module)`` of every published-style MeanSparse module, in registration order."""
    return [(path, m) for path, m in model.named_modules() if path and is_published_module(m)]


def has_statistics(module: nn.Module) -> bool:
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


def candidate_sites(
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
    calls = _probe_calls(model, example_input, modules)
    found: list[tuple[Site, str]] = []
    for path, module, shape in calls:
        channels = int(module.running_mean.numel())
        variant = variant_of(module)
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


def _probe_calls(
    model: nn.Module, example_input: torch.Tensor, modules: list[tuple[str, nn.Module]]
) -> list[tuple[str, nn.Module, tuple[int, ...]]]:
    """The published modules a probe forward calls, in call order, each with its input's shape; one line for a
    module called twice or never."""
    calls: list[tuple[str, nn.Module, tuple[int, ...]]] = []
    handles = []
    for path, module in modules:

        def record(m: nn.Module, args: tuple, path: str = path) -> None:
            calls.append((path, m, tuple(args[0].shape)))

        handles.append(module.register_forward_pre_hook(record))
    try:
        with probing(model, example_input):
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
    return calls


def insert_operators(
    model: nn.Module,
    candidates: Sequence[tuple[Site, str]],
    chosen: set[int],
    make_operator: Callable[[Site], tuple[MeanSparse, Site]],
) -> list[Site]:
    """Replace each chosen published module by an operator holding its statistics and threshold (its alpha)."""
    placed: list[Site] = []
    for site, path in candidates:
        if site.index not in chosen:
            continue
        old = model.get_submodule(path)
        op, site = make_operator(site)
        op.to(device=old.running_mean.device, dtype=old.running_mean.dtype)
        op.set_alpha(float(old.threshold))
        if has_statistics(old):
            op.set_statistics(old.running_mean, old.running_var, count=1)
        parent_path, _, name = path.rpartition(".")
        setattr(model.get_submodule(parent_path) if parent_path else model, name, op)
        placed.append(site)
    return placed
