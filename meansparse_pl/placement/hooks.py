"""The ``hooks`` placement strategy, for models torch.fx cannot trace: a forward pre-hook on each activation
*module*; a module called k times per forward gets k operators dispatched by call order. Functional calls cannot
be reached this way, so if a probe finds any, placement stops with an error naming the module.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from meansparse_pl.errors import PlacementError
from meansparse_pl.ops import MeanSparse
from meansparse_pl.placement import registry
from meansparse_pl.placement.layout import (
    infer_channel_dim_from_shape,
    override_channel_dim,
    probing,
    producer_layout,
)
from meansparse_pl.placement.record import Site
from meansparse_pl.placement.registry import is_activation_module


class _FunctionalActivationSpy(TorchFunctionMode):
    """Records functional activation calls made outside activation modules during a probe forward."""

    def __init__(self, module_stack: list[str]) -> None:
        super().__init__()
        self.module_stack = module_stack
        self.inside_activation = 0
        self.calls: list[tuple[str, str]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = registry.ACTIVATION_FUNCTIONS.get(func)
        if name is None and getattr(func, "__name__", None) in registry.ACTIVATION_METHODS and args:
            name = registry.ACTIVATION_METHODS[func.__name__]
        if name is not None and not self.inside_activation:
            self.calls.append((self.module_stack[-1] if self.module_stack else "", name))
        return func(*args, **(kwargs or {}))


class _CallSiteDispatch(nn.Module):
    """Holds the operators of one activation module, one per call site, applied in call order."""

    def __init__(self, ops: list[nn.Module]) -> None:
        super().__init__()
        self.ops = nn.ModuleList(ops)
        self.next_call = 0

    def __call__(self, module: nn.Module, args: tuple) -> tuple:  # forward pre-hook
        if self.next_call >= len(self.ops):
            raise PlacementError(
                f"{getattr(self.ops[0], 'site_name', 'an activation')}: the activation was called more often than in the probe forward; "
                "hook placement needs a fixed call pattern; make the model traceable by torch.fx instead."
            )
        op = self.ops[self.next_call]
        self.next_call += 1
        x = args[0]
        if not getattr(module, "inplace", False) or isinstance(op, nn.Identity):
            return (op(x), *args[1:])
        # an in-place activation mutates its input and the model may keep reading that tensor: the sparsified
        # values are written into it, so the activation mutates the tensor the model holds, as without the
        # operator. The operator reads a copy when autograd records: a backward that keeps its input (the fused
        # exact kernel, the surrogate) must not see that input overwritten
        recording = torch.is_grad_enabled() and x.requires_grad
        return (x.copy_(op(x.clone() if recording else x)), *args[1:])


class _ResetDispatch:
    """Root forward pre-hook: a new forward starts every activation's call count from zero."""

    def __init__(self, dispatches: list[_CallSiteDispatch]) -> None:
        self.dispatches = dispatches

    def __call__(self, module: nn.Module, args: tuple) -> None:
        for dispatch in self.dispatches:
            dispatch.next_call = 0


def activation_sites(
    model: nn.Module, example_input: torch.Tensor, channel_dims: dict[str, int] | None, trace_error: str
) -> list[tuple[Site, nn.Module]]:
    records: list[tuple[str, nn.Module, tuple[int, ...], int | None]] = []
    module_stack: list[str] = []
    spy = _FunctionalActivationSpy(module_stack)
    handles = []
    # the outputs of conv / norm / linear layers during the probe, by identity (kept alive, so no id is reused):
    # an activation fed one of them directly takes that layer's channel axis instead of a guess from its shape
    produced: dict[int, tuple[torch.Tensor, int]] = {}
    for path, module in model.named_modules():

        def push(m, args, path=path):
            module_stack.append(path)
            if is_activation_module(m):
                spy.inside_activation += 1
                if args and isinstance(args[0], torch.Tensor):
                    source = produced.get(id(args[0]))
                    records.append((path, m, tuple(args[0].shape), None if source is None else source[1]))

        def pop(m, args, output):
            module_stack.pop()
            if is_activation_module(m):
                spy.inside_activation -= 1
            layout = producer_layout(m)
            if layout is not None and isinstance(output, torch.Tensor):
                produced[id(output)] = (output, layout[0])

        handles.append(module.register_forward_pre_hook(push))
        handles.append(module.register_forward_hook(pop))
    try:
        with probing(model, example_input), spy:
            model(example_input)
    finally:
        for h in handles:
            h.remove()
    if spy.calls:
        where, call = spy.calls[0]
        raise PlacementError(
            f"torch.fx cannot trace this model ({trace_error}) and `{where or 'the model'}` calls {call} "
            "functionally, which hook placement cannot reach; make that module traceable, list the "
            "untraceable submodule in leaf_modules, or use an activation module (nn.ReLU, ...) there."
        )
    return [_site(i, *record, channel_dims) for i, record in enumerate(records)]


def _site(
    index: int,
    path: str,
    module: nn.Module,
    shape: tuple[int, ...],
    producer_dim: int | None,
    channel_dims: dict[str, int] | None,
) -> tuple[Site, nn.Module]:
    """The site of one activation call: its channel axis from ``channel_dims``, else the producing layer's, else
    the shape's (one line asking for ``channel_dims`` when none says)."""
    dim = override_channel_dim(path, channel_dims)
    if dim is None:
        dim = producer_dim if producer_dim is not None else infer_channel_dim_from_shape(shape, guess=False)
    if dim is None:
        raise PlacementError(
            f"{path}: the input {shape} comes from no conv / norm / linear layer directly and its shape does not "
            "say which axis holds the channels (no square spatial pair); give it with channel_dims="
            f"{{{path!r}: <axis>}}."
        )
    return Site(index, path, f"nn.{type(module).__name__}", shape, dim, shape[dim]), module


def insert_operators(
    model: nn.Module,
    candidates: Sequence[tuple[Site, nn.Module]],
    chosen: set[int],
    make_operator: Callable[[Site], tuple[MeanSparse, Site]],
) -> list[Site]:
    """Attach the operators of the chosen sites to their activation modules; returns the placed sites."""
    placed: list[Site] = []
    per_module: dict[int, list[nn.Module]] = {}
    modules: dict[int, nn.Module] = {}
    for site, module in candidates:
        # every call of a module gets a slot so dispatch stays aligned with the call order; calls that the
        # rules leave out get an identity slot.
        slot: nn.Module = nn.Identity()
        if site.index in chosen:
            slot, site = make_operator(site)
            placed.append(site)
        per_module.setdefault(id(module), []).append(slot)
        modules[id(module)] = module
    dispatches = []
    for key, slots in per_module.items():
        dispatch = _CallSiteDispatch(slots)
        modules[key].add_module("meansparse", dispatch)
        modules[key].register_forward_pre_hook(dispatch)
        dispatches.append(dispatch)
    model.register_forward_pre_hook(_ResetDispatch(dispatches))
    return placed
