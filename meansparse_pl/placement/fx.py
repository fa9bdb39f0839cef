"""The ``fx`` placement strategy: a torch.fx graph has one node per *call*, so functional activations
(``F.relu``, ``torch.relu``, ``x.relu()``) are found, and an activation module called at several places
(torchvision's ResNet BasicBlock reuses ``self.relu``) gets one operator per call site. The result is a
``GraphModule`` that shares its parameters with the input model.

Presets add two more site kinds here (``residual_add``: after the sum of two input-dependent tensors of equal
shape; ``after_module``: after a call of a module matched by name), see
:class:`~meansparse_pl.placement.registry.PlacementPreset`.
"""

from __future__ import annotations

import fnmatch
import inspect
import operator
import re
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from meansparse_pl.modes import eval_mode
from meansparse_pl.ops import FusedActivation, MeanSparse, fusable_activation
from meansparse_pl.placement import registry
from meansparse_pl.placement.layout import (
    axis_of_width,
    infer_channel_dim_from_shape,
    override_channel_dim,
    probing,
    producer_layout,
)
from meansparse_pl.placement.record import Site
from meansparse_pl.placement.registry import PlacementPreset, is_activation_module

# Producers that tell the channel axis of the tensor they emit.


# stochastic-depth modules (timm's DropPath and DropBlock, torchvision's StochasticDepth) branch on
# self.training in Python: kept as modules, so the sparsified model still drops paths in train() (fine-tuning
# through the operators) instead of the eval-mode identity fixed at trace time
STOCHASTIC_MODULES = ("DropPath", "DropBlock2d", "StochasticDepth")


class ActivationLeafTracer(fx.Tracer):
    # the default lets torch.load / multiprocessing re-create the tracer (GraphModule.__reduce__ retraces with
    # a no-argument subclass of the recorded tracer class)
    def __init__(self, leaf_patterns: Sequence[str] = ()) -> None:
        super().__init__()
        self.leaf_patterns = list(leaf_patterns)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, MeanSparse) or is_activation_module(m) or type(m).__name__ in STOCHASTIC_MODULES:
            return True
        if any(fnmatch.fnmatchcase(module_qualified_name, p) for p in self.leaf_patterns):
            return True
        return super().is_leaf_module(m, module_qualified_name)


def trace(model: nn.Module, leaf_modules: Sequence[str]) -> fx.GraphModule:
    tracer = ActivationLeafTracer(leaf_modules)
    # Trace in eval mode: MeanSparse models are used frozen, and Python branches on `self.training` in traced code
    # (F.dropout(training=self.training)) are fixed at trace time; nn.Dropout and the STOCHASTIC_MODULES stay
    # modules and follow train() / eval().
    with eval_mode(model):
        graph = tracer.trace(model)
    gm = fx.GraphModule(tracer.root, graph, model.__class__.__name__)
    # Not gm.train(...): the submodules are the model's own, and a recursive train() would overwrite a mixed
    # train / eval state (e.g. frozen BatchNorm in a training model).
    gm.training = model.training
    return gm


def readable_asserts(gm: fx.GraphModule, input_shape: tuple[int, ...]) -> None:
    """Shape checks traced into the graph (``torch._assert``) keep the message fx formatted at trace time, with
    placeholders for the values (``Input height (Proxy(getitem_2)) doesn't match model (32)``): rewrite it to say
    what the traced model takes and what to do."""
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is torch._assert and len(node.args) > 1:
            message = node.args[1]
            if isinstance(message, str) and "Proxy(" in message:
                readable = re.sub(r"\s*\(Proxy\([^)]*\)\)", "", message)  # "height (Proxy(..))" -> "height"
                readable = re.sub(r"Proxy\([^)]*\)", "another value", readable).rstrip(".! ")
                node.args = (
                    node.args[0],
                    f"{readable}: this sparsified model was traced for inputs of shape {tuple(input_shape)}; "
                    "sparsify the model again with an example input of the new size.",
                )
    gm.recompile()


def owner_path(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    return list(stack.values())[-1][0]


def _node_call(node: fx.Node, gm: fx.GraphModule) -> tuple[str, str] | None:
    """(module_path, call) if the node is an activation call, else None."""
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        if is_activation_module(module):
            return str(node.target), f"nn.{type(module).__name__}"
    elif node.op == "call_function" and node.target in registry.ACTIVATION_FUNCTIONS:
        return owner_path(node), registry.ACTIVATION_FUNCTIONS[node.target]
    elif node.op == "call_method" and node.target in registry.ACTIVATION_METHODS:
        return owner_path(node), registry.ACTIVATION_METHODS[node.target]
    return None


def _is_inplace(node: fx.Node, gm: fx.GraphModule) -> bool:
    """Whether the activation call mutates its input (``nn.ReLU(inplace=True)``, ``F.relu_``, ``x.relu_()``)."""
    if node.op == "call_module":
        return bool(getattr(gm.get_submodule(node.target), "inplace", False))
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
    if name.endswith("_") or node.kwargs.get("inplace", False):
        return True
    try:
        bound = inspect.signature(node.target).bind(*node.args, **node.kwargs)
    except (TypeError, ValueError):  # builtins without a Python signature
        return False
    return bool(bound.arguments.get("inplace", False))


def _redirect_later_uses(source: fx.Node, activation: fx.Node) -> None:
    """After an in-place activation, code that keeps using the input tensor sees the activated values. Once an
    operator sits in between, the activation mutates the operator's output instead, so later readers of the
    input must read the activation's result (the same tensor in the original model)."""
    current = activation.next
    while current.op != "root":
        if source in current.all_input_nodes:
            current.replace_input_with(source, activation)
        current = current.next


_RELU_FUNCTIONS = (F.relu, F.relu_, torch.relu, torch.relu_)


def _fusable_activation(node: fx.Node, gm: fx.GraphModule) -> FusedActivation | None:
    """The activation of an fx call node as a :class:`FusedActivation`, or None when it must stay a call.

    Only exact piecewise-linear activations of plain ``nn`` classes (not subclasses, which may change
    ``forward``) are taken, only with a single tensor argument, and only modules without hooks: a fused
    activation module is no longer called, so a hook on it would silently stop firing.
    """
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        if module._forward_hooks or module._forward_pre_hooks or len(node.args) != 1 or node.kwargs:
            return None
        if type(module) is nn.ReLU:
            return fusable_activation("relu", inplace=module.inplace)
        if type(module) is nn.ReLU6:
            return fusable_activation("relu6", inplace=module.inplace)
        if type(module) is nn.LeakyReLU:
            return fusable_activation(
                "leaky_relu", inplace=module.inplace, negative_slope=module.negative_slope
            )
        return None
    only_input = len(node.args) == 1 and set(node.kwargs) <= {"inplace"}
    if node.op == "call_function" and node.target in _RELU_FUNCTIONS and only_input:
        return fusable_activation("relu", inplace=_is_inplace(node, gm))
    if node.op == "call_method" and node.target in ("relu", "relu_") and only_input and not node.kwargs:
        return fusable_activation("relu", inplace=_is_inplace(node, gm))
    return None


def _fuse_into_operator(node: fx.Node, sparsified: fx.Node, op: MeanSparse, gm: fx.GraphModule) -> str:
    """Let the operator feeding an activation call apply that activation itself, and drop the call.

    Returns the fused activation's name, or "" when the activation stays a call of its own. Fusing saves
    one read and one write of the activation's input per call in inference (see ``benchmarks/``)."""
    activation = _fusable_activation(node, gm)
    if activation is None:
        return ""
    op.activation = activation
    if node.op == "call_module":  # a hook registered on the module later still fires (see MeanSparse.forward)
        op.attach_fused_module(gm.get_submodule(node.target))
    node.replace_all_uses_with(sparsified)
    gm.graph.erase_node(node)
    return activation.name


# tensor methods and functions that rearrange axes or merge / split them: the producer's axis then moves
_RESHAPES = {"view", "reshape", "reshape_as", "view_as", "flatten", "unflatten", "permute", "transpose", "movedim",
             "squeeze", "unsqueeze", "swapaxes"}  # fmt: skip


def _producer_channel_dim(
    node: fx.Node, gm: fx.GraphModule, shape: tuple[int, ...] = (), path: str = "", depth: int = 12
) -> int | None:
    """Walk back through elementwise and reshaping ops to the nearest conv / norm / linear and read its layout;
    past a reshape, the channel axis is the one axis of ``shape`` of the producer's width (LeViT's
    ``Linear -> flatten(0, 1) -> BatchNorm1d -> reshape_as``: the last axis, not BatchNorm's axis 1)."""
    current: Any = node
    reshaped = False
    for _ in range(depth):
        if not isinstance(current, fx.Node) or current.op in ("placeholder", "get_attr") or not current.args:
            return None
        if current.op == "call_module":
            layout = producer_layout(gm.get_submodule(current.target))
            if layout is not None:
                return axis_of_width(shape, layout[1], path) if reshaped and shape else layout[0]
        name = current.target if current.op == "call_method" else getattr(current.target, "__name__", "")
        if current.op in ("call_method", "call_function") and name in _RESHAPES:
            reshaped = True
        current = current.args[0]
    return None


def activation_sites(
    gm: fx.GraphModule, example_input: torch.Tensor, channel_dims: dict[str, int] | None
) -> list[tuple[Site, fx.Node]]:
    with probing(gm, example_input):
        ShapeProp(gm).propagate(example_input)
    found: list[tuple[Site, fx.Node]] = []
    for node in gm.graph.nodes:
        described = _node_call(node, gm)
        if described is None:
            continue
        path, call = described
        source = node.args[0]
        meta = source.meta.get("tensor_meta") if isinstance(source, fx.Node) else None
        if meta is None or not hasattr(meta, "shape"):
            continue  # not a tensor input (cannot happen for real activations, kept defensive)
        shape = tuple(int(s) for s in meta.shape)
        dim = override_channel_dim(path, channel_dims)
        if dim is None:
            dim = 1 if len(shape) <= 2 else _producer_channel_dim(source, gm, shape, path)
        if dim is None:
            dim = infer_channel_dim_from_shape(shape)
        found.append((Site(len(found), path, call, shape, dim, shape[dim]), node))
    return found


# Residual sums: additions of two input-dependent tensors of the same shape (see PlacementPreset).
_ADD_FUNCTIONS: dict[Any, str] = {
    operator.add: "operator.add",
    operator.iadd: "operator.iadd",
    torch.add: "torch.add",
}
_ADD_METHODS: dict[str, str] = {"add": "Tensor.add", "add_": "Tensor.add_"}


def _tensor_shape(node: Any) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    if meta is None or not hasattr(meta, "shape"):
        return None
    return tuple(int(s) for s in meta.shape)


def _input_dependent(gm: fx.GraphModule) -> set[fx.Node]:
    """Nodes whose value depends on a model input (graph order is topological, so one pass suffices)."""
    dependent: set[fx.Node] = set()
    for node in gm.graph.nodes:
        if node.op == "placeholder" or any(a in dependent for a in node.all_input_nodes):
            dependent.add(node)
    return dependent


def _residual_add_call(node: fx.Node, dependent: set[fx.Node]) -> str | None:
    """The call's name if ``node`` is a residual sum, else None.

    Both operands must depend on the input (``x + pos_embed`` and ``attn + relative_position_bias`` add a
    parameter, not a residual) and have the output's shape (a broadcast add is a bias, not a residual).
    """
    if node.op == "call_function":
        name = _ADD_FUNCTIONS.get(node.target)
    elif node.op == "call_method" and isinstance(node.target, str):
        name = _ADD_METHODS.get(node.target)
    else:
        return None
    if name is None or len(node.args) < 2:
        return None
    operands = node.args[:2]
    if not all(isinstance(a, fx.Node) and a in dependent for a in operands):
        return None
    shape = _tensor_shape(node)
    meta = node.meta.get("tensor_meta")
    if shape is None or not getattr(meta, "dtype", torch.float32).is_floating_point:
        return None
    if any(_tensor_shape(a) != shape for a in operands):
        return None
    return name


def _site_channel_dim(
    path: str,
    shape: tuple[int, ...],
    start_nodes: Sequence[Any],
    gm: fx.GraphModule,
    channel_dims: dict[str, int] | None,
    preset: PlacementPreset,
) -> int:
    """Caller override, then preset override, then the nearest producer's layout, then the shape."""
    dim = override_channel_dim(path, channel_dims)
    if dim is None:
        dim = override_channel_dim(path, dict(preset.channel_dims))
    if dim is None and len(shape) <= 2:
        dim = 1
    for start in start_nodes:
        if dim is not None:
            break
        dim = _producer_channel_dim(start, gm, shape, path)
    if dim is None:
        dim = infer_channel_dim_from_shape(shape)
    return dim


def preset_sites(
    gm: fx.GraphModule,
    example_input: torch.Tensor,
    channel_dims: dict[str, int] | None,
    preset: PlacementPreset,
) -> list[tuple[Site, fx.Node]]:
    """Every site of the preset's kinds, in graph (forward) order, numbered among themselves."""
    with probing(gm, example_input):
        ShapeProp(gm).propagate(example_input)
    dependent = _input_dependent(gm) if preset.residual_adds else set()
    found: list[tuple[Site, fx.Node]] = []
    for node in gm.graph.nodes:
        kind = path = call = None
        start: list[Any] = []
        shape: tuple[int, ...] | None = None
        described = _node_call(node, gm) if preset.activations else None
        if described is not None:
            (path, call), kind = described, "activation"
            shape, start = _tensor_shape(node.args[0]), [node.args[0]]
        elif preset.residual_adds and (add := _residual_add_call(node, dependent)) is not None:
            path, call, kind = owner_path(node), f"residual {add}", "residual_add"
            shape, start = _tensor_shape(node), list(node.args[:2])
        elif (
            node.op == "call_module"
            and preset.after_modules
            and any(fnmatch.fnmatchcase(str(node.target), p) for p in preset.after_modules)
            and not isinstance(gm.get_submodule(node.target), MeanSparse)
        ):
            module = gm.get_submodule(node.target)
            path, call, kind = str(node.target), f"after {type(module).__name__}", "after_module"
            shape, start = _tensor_shape(node), [node]
        if kind is None or shape is None:
            continue
        if any(fnmatch.fnmatchcase(path, p) for p in preset.exclude):
            continue
        dim = _site_channel_dim(path, shape, start, gm, channel_dims, preset)
        found.append((Site(len(found), path, call, shape, dim, shape[dim], kind=kind), node))
    return found


def insert_operators(
    gm: fx.GraphModule,
    candidates: Sequence[tuple[Site, fx.Node]],
    chosen: set[int],
    make_operator: Callable[[Site], tuple[MeanSparse, Site]],
    fuse_activations: bool,
) -> list[Site]:
    """Put an operator at every chosen site of the traced graph; returns the placed sites, in order."""
    placed: list[Site] = []
    for site, node in candidates:
        if site.index not in chosen:
            continue
        op, site = make_operator(site)
        gm.add_submodule(site.operator_name, op)
        if site.kind == "activation":
            source = node.args[0]
            if _is_inplace(node, gm):
                _redirect_later_uses(source, node)
            with gm.graph.inserting_before(node):
                sparsified = gm.graph.call_module(site.operator_name, (source,))
            node.update_arg(0, sparsified)
            if fuse_activations:
                site = replace(site, fused_activation=_fuse_into_operator(node, sparsified, op, gm))
        else:  # residual_add / after_module: the operator takes the node's output, every user reads it
            with gm.graph.inserting_after(node):
                sparsified = gm.graph.call_module(site.operator_name, (node,))
            node.replace_all_uses_with(sparsified, delete_user_cb=lambda user, op=sparsified: user is not op)
        placed.append(site)
    gm.graph.lint()
    gm.recompile()
    return placed
