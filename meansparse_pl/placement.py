"""Find every activation call site of a model and put a MeanSparse operator in front of it.

Two strategies, like torch.ao.quantization's eager and fx modes:

* ``fx`` (default whenever the model traces): a torch.fx graph has one node per *call*, so functional
  activations (``F.relu``, ``torch.relu``, ``x.relu()``) are found, and an activation module called at
  several places (torchvision's ResNet BasicBlock reuses ``self.relu``) gets one operator per call site.
  The result is a ``GraphModule`` that shares its parameters with the input model.
* ``hooks`` (fallback for models fx cannot trace): a forward pre-hook on each activation *module*; a
  module called k times per forward gets k operators dispatched by call order. Functional calls cannot be
  reached this way, so if a probe finds any, placement stops with an error naming the module.

The channel axis of each site is decided from a probe forward: ``(N, C, ...)`` conv features use dim 1,
``(N, L, C)`` tokens and ``(N, H, W, C)`` channels-last MLP features use the last dim.

Presets. The paper places operators "before all activations" (preset ``activations``, the default). The
released MeanSparse models also put operators after residual sums and after MLP output projections; the
``published_*`` presets reproduce those sites with three more fx site kinds (``residual_add``: after the sum
of two input-dependent tensors of equal shape; ``after_module``: after a call of a module matched by name),
see :data:`PRESETS` and ``docs/published_models.md``. A fourth strategy, ``published``, swaps the
published-style MeanSparse modules a model already contains for this package's operators
(:mod:`meansparse_pl.published`).
"""

from __future__ import annotations

import contextlib
import fnmatch
import inspect
import operator
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp
from torch.overrides import TorchFunctionMode

from meansparse_pl.errors import ConfigurationError, PlacementError
from meansparse_pl.operator import (
    BackwardMode,
    Centre,
    FusedActivation,
    MeanSparse,
    check_alpha,
    fusable_activation,
    operators,
)

Strategy = Literal["auto", "fx", "hooks", "published"]
SiteKind = Literal["activation", "residual_add", "after_module", "published"]

# --------------------------------------------------------------------------------------------- registry
ACTIVATION_MODULES: list[type[nn.Module]] = [
    nn.ReLU,
    nn.ReLU6,
    nn.GELU,
    nn.SiLU,
    nn.ELU,
    nn.CELU,
    nn.SELU,
    nn.LeakyReLU,
    nn.RReLU,
    nn.Mish,
    nn.Hardswish,
    nn.Softplus,
    nn.PReLU,
]
ACTIVATION_FUNCTIONS: dict[Callable, str] = {
    F.relu: "F.relu",
    F.relu_: "F.relu_",
    torch.relu: "torch.relu",
    torch.relu_: "torch.relu_",
    F.relu6: "F.relu6",
    F.gelu: "F.gelu",
    F.silu: "F.silu",
    F.elu: "F.elu",
    F.celu: "F.celu",
    F.selu: "F.selu",
    torch.selu: "torch.selu",
    F.leaky_relu: "F.leaky_relu",
    F.mish: "F.mish",
    F.hardswish: "F.hardswish",
    F.softplus: "F.softplus",
    F.prelu: "F.prelu",
    torch.prelu: "torch.prelu",
}
ACTIVATION_METHODS: dict[str, str] = {"relu": "Tensor.relu", "relu_": "Tensor.relu_"}

# Producers that tell the channel axis of the tensor they emit.
_CHANNELS_FIRST_PRODUCERS = (nn.modules.conv._ConvNd, nn.modules.batchnorm._BatchNorm, nn.GroupNorm)
_CHANNELS_LAST_PRODUCERS = (nn.Linear, nn.LayerNorm)


def register_activation(activation: type[nn.Module] | Callable, name: str | None = None) -> None:
    """Make placement treat a module type (e.g. a parametric activation) or a function as an activation."""
    if isinstance(activation, type) and issubclass(activation, nn.Module):
        if activation not in ACTIVATION_MODULES:
            ACTIVATION_MODULES.append(activation)
    elif callable(activation):
        ACTIVATION_FUNCTIONS[activation] = name or getattr(activation, "__qualname__", repr(activation))
    else:
        raise ConfigurationError(
            f"register_activation takes an nn.Module subclass or a function, got {activation!r}."
        )


def _is_activation_module(module: nn.Module) -> bool:
    return isinstance(module, tuple(ACTIVATION_MODULES))


# ---------------------------------------------------------------------------------------------- presets
@dataclass(frozen=True)
class PlacementPreset:
    """A named site rule: which kinds of fx sites get an operator.

    Attributes:
        name: the name recorded in :class:`Placement` (checkpoints rebuild the same sites from it).
        description: one line for documentation and error messages.
        activations: an operator before every activation call (the paper's rule).
        residual_adds: an operator after every residual sum: an ``add`` of two tensors of the same shape
            that both depend on the model input (so ``x + pos_embed`` or ``attn + relative_bias`` are not
            residual sums, ``x + f(x)`` and ``shortcut(x) + f(x)`` are).
        after_modules: fnmatch patterns of module paths: an operator after every call of a matching
            module. Matching modules are traced as leaves, so a module fx would trace through (timm's
            ``DropPath``) is still one call site.
        exclude: fnmatch patterns of site module paths never sparsified (squeeze-and-excitation blocks).
        channel_dims: fnmatch pattern -> channel axis for sites whose layout the automatic detection
            cannot see (window-attention outputs reach the residual sum through reshapes); the caller's
            ``channel_dims`` still take precedence.
    """

    name: str
    description: str
    activations: bool = True
    residual_adds: bool = False
    after_modules: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    channel_dims: tuple[tuple[str, int], ...] = ()


PRESETS: dict[str, PlacementPreset] = {}


def register_preset(preset: PlacementPreset) -> None:
    """Make a site rule available by name to :func:`sparsify` (and to checkpoints that record it)."""
    if not isinstance(preset, PlacementPreset):
        raise ConfigurationError(f"register_preset takes a PlacementPreset, got {preset!r}.")
    if not (preset.activations or preset.residual_adds or preset.after_modules):
        raise ConfigurationError(f"preset {preset.name!r} selects no site kind.")
    PRESETS[preset.name] = preset


for _preset in (
    PlacementPreset("activations", "before every activation call (the paper's rule)"),
    PlacementPreset(
        "published_wrn",
        "released S-WRN / Ra-WRN models: before every activation and after every residual sum; nothing "
        "inside squeeze-and-excitation modules",
        residual_adds=True,
        exclude=("*.se.*", "*.se"),
    ),
    PlacementPreset(
        "published_convnext",
        "released ConvNeXt-L: before the MLP activation (channels-last) and after drop_path on the "
        "residual branch, before the add (channels-first)",
        after_modules=("*.drop_path",),
        channel_dims=(("*.drop_path", 1), ("*.mlp.act", -1)),
    ),
    PlacementPreset(
        "published_swin",
        "released Swin-L: after both residual sums of every block, before the MLP activation and after the "
        "MLP's fc2; every feature is channels-last",
        residual_adds=True,
        after_modules=("*.mlp.fc2",),
        channel_dims=(("*", -1),),
    ),
):
    register_preset(_preset)


def get_preset(name: str) -> PlacementPreset:
    """The preset called ``name``, or a ConfigurationError listing the known ones."""
    preset = PRESETS.get(name) if isinstance(name, str) else None
    if preset is None:
        raise ConfigurationError(f"unknown placement preset {name!r}; known presets: {', '.join(PRESETS)}.")
    return preset


# ------------------------------------------------------------------------------------------------ sites
@dataclass(frozen=True)
class Site:
    """One activation call site: where it is, what it calls, and the layout of its input."""

    index: int  # position among all activation call sites of the model, in forward order
    module_path: str  # the activation module, or the module whose forward makes the functional call
    call: str  # "nn.ReLU", "F.relu", "Tensor.relu", ...
    input_shape: tuple[int, ...]  # from the probe forward (batch dim included)
    channel_dim: int
    num_channels: int
    operator_name: str = ""  # attribute name of the inserted operator, "" before insertion
    # what the operator is attached to: the input of an activation call (the paper's rule), the output of a
    # residual sum or of a named module (published presets), or a swapped published module. The default
    # keeps records written before site kinds existed loadable.
    kind: str = "activation"
    # the activation the operator applies itself, when placement fused the two (see _fusable_activation)
    fused_activation: str = ""


@dataclass
class Placement:
    """Everything needed to rebuild the same operators on a fresh instance of the architecture."""

    strategy: str
    input_shape: tuple[int, ...]  # example input shape without the batch dim
    include: list[str] | None = None
    exclude: list[str] | None = None
    site_indices: list[int] | None = None
    channel_dims: dict[str, int] | None = None
    leaf_modules: list[str] | None = None
    centre: str = "channel_mean"
    sites: list[Site] = field(default_factory=list)
    # the site rule (see PRESETS); the default keeps records written before presets existed loadable
    preset: str = "activations"
    # whether operators took over the piecewise-linear activation after them; records written before this
    # existed load with the default, which gives the same values and the same state dict
    fuse_activations: bool = True

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["sites"] = [asdict(s) for s in self.sites]
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Placement:
        data = dict(data)
        sites = [Site(**{**s, "input_shape": tuple(s["input_shape"])}) for s in data.pop("sites", [])]
        data["input_shape"] = tuple(data["input_shape"])
        return cls(**data, sites=sites)


def _infer_channel_dim_from_shape(shape: Sequence[int]) -> int:
    if len(shape) <= 2:
        return 1
    if len(shape) == 3:
        return -1  # (N, L, C) token features
    # 4-D and more: square spatial dims at the end -> (N, C, H, W); square dims after N -> (N, H, W, C)
    if shape[-1] == shape[-2]:
        return 1
    if shape[1] == shape[2]:
        return -1
    return 1


def _override_channel_dim(path: str, overrides: dict[str, int] | None) -> int | None:
    for pattern, dim in (overrides or {}).items():
        if fnmatch.fnmatchcase(path, pattern):
            return dim
    return None


# ------------------------------------------------------------------------------------------------- fx
class _ActivationLeafTracer(fx.Tracer):
    # the default lets torch.load / multiprocessing re-create the tracer (GraphModule.__reduce__ retraces with
    # a no-argument subclass of the recorded tracer class)
    def __init__(self, leaf_patterns: Sequence[str] = ()) -> None:
        super().__init__()
        self.leaf_patterns = list(leaf_patterns)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, MeanSparse) or _is_activation_module(m):
            return True
        if any(fnmatch.fnmatchcase(module_qualified_name, p) for p in self.leaf_patterns):
            return True
        return super().is_leaf_module(m, module_qualified_name)


def _trace(model: nn.Module, leaf_modules: Sequence[str]) -> fx.GraphModule:
    tracer = _ActivationLeafTracer(leaf_modules)
    # Trace in eval mode: MeanSparse models are used frozen, and Python branches on `self.training` (timm's
    # DropPath, F.dropout(training=self.training)) are fixed at trace time.
    with _probe_mode(model):
        graph = tracer.trace(model)
    gm = fx.GraphModule(tracer.root, graph, model.__class__.__name__)
    # Not gm.train(...): the submodules are the model's own, and a recursive train() would overwrite a mixed
    # train / eval state (e.g. frozen BatchNorm in a training model).
    gm.training = model.training
    return gm


def _owner_path(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    return list(stack.values())[-1][0]


def _node_call(node: fx.Node, gm: fx.GraphModule) -> tuple[str, str] | None:
    """(module_path, call) if the node is an activation call, else None."""
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        if _is_activation_module(module):
            return str(node.target), f"nn.{type(module).__name__}"
    elif node.op == "call_function" and node.target in ACTIVATION_FUNCTIONS:
        return _owner_path(node), ACTIVATION_FUNCTIONS[node.target]
    elif node.op == "call_method" and node.target in ACTIVATION_METHODS:
        return _owner_path(node), ACTIVATION_METHODS[node.target]
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
            return fusable_activation("relu")
        if type(module) is nn.ReLU6:
            return fusable_activation("relu6")
        if type(module) is nn.LeakyReLU:
            return fusable_activation("leaky_relu", negative_slope=module.negative_slope)
        return None
    only_input = len(node.args) == 1 and set(node.kwargs) <= {"inplace"}
    if node.op == "call_function" and node.target in _RELU_FUNCTIONS and only_input:
        return fusable_activation("relu")
    if node.op == "call_method" and node.target in ("relu", "relu_") and only_input and not node.kwargs:
        return fusable_activation("relu")
    return None


def _fuse_into_operator(node: fx.Node, sparsified: fx.Node, op: MeanSparse, gm: fx.GraphModule) -> str:
    """Let the operator feeding an activation call apply that activation itself, and drop the call.

    Returns the fused activation's name, or "" when the activation stays a call of its own. Fusing saves
    one read and one write of the activation's input per call in inference (see ``benchmarks/``)."""
    activation = _fusable_activation(node, gm)
    if activation is None:
        return ""
    op.activation = activation
    node.replace_all_uses_with(sparsified)
    gm.graph.erase_node(node)
    return activation.name


def _producer_channel_dim(node: fx.Node, gm: fx.GraphModule, depth: int = 8) -> int | None:
    """Walk back through elementwise ops to the nearest conv / norm / linear and read its layout."""
    current: Any = node
    for _ in range(depth):
        if not isinstance(current, fx.Node):
            return None
        if current.op == "call_module":
            module = gm.get_submodule(current.target)
            if isinstance(module, _CHANNELS_FIRST_PRODUCERS):
                return 1
            if isinstance(module, _CHANNELS_LAST_PRODUCERS):
                return -1
        if current.op in ("placeholder", "get_attr") or (
            current.op == "call_method" and current.target in ("permute", "transpose", "view", "reshape")
        ):
            return None
        if not current.args:
            return None
        current = current.args[0]
    return None


def _fx_candidate_sites(
    gm: fx.GraphModule, example_input: torch.Tensor, channel_dims: dict[str, int] | None
) -> list[tuple[Site, fx.Node]]:
    with _probe_mode(gm), torch.no_grad():
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
        dim = _override_channel_dim(path, channel_dims)
        if dim is None:
            dim = 1 if len(shape) <= 2 else _producer_channel_dim(source, gm)
        if dim is None:
            dim = _infer_channel_dim_from_shape(shape)
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
    dim = _override_channel_dim(path, channel_dims)
    if dim is None:
        dim = _override_channel_dim(path, dict(preset.channel_dims))
    if dim is None and len(shape) <= 2:
        dim = 1
    for start in start_nodes:
        if dim is not None:
            break
        dim = _producer_channel_dim(start, gm)
    if dim is None:
        dim = _infer_channel_dim_from_shape(shape)
    return dim


def _fx_preset_candidate_sites(
    gm: fx.GraphModule,
    example_input: torch.Tensor,
    channel_dims: dict[str, int] | None,
    preset: PlacementPreset,
) -> list[tuple[Site, fx.Node]]:
    """Every site of the preset's kinds, in graph (forward) order, numbered among themselves."""
    with _probe_mode(gm), torch.no_grad():
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
            path, call, kind = _owner_path(node), f"residual {add}", "residual_add"
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


@contextlib.contextmanager
def _probe_mode(model: nn.Module):
    """Eval mode for a probe forward (no BatchNorm statistics change, no dropout); restores modes after."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode


# ---------------------------------------------------------------------------------------------- hooks
class _FunctionalActivationSpy(TorchFunctionMode):
    """Records functional activation calls made outside activation modules during a probe forward."""

    def __init__(self, module_stack: list[str]) -> None:
        super().__init__()
        self.module_stack = module_stack
        self.inside_activation = 0
        self.calls: list[tuple[str, str]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = ACTIVATION_FUNCTIONS.get(func)
        if name is None and getattr(func, "__name__", None) in ACTIVATION_METHODS and args:
            name = ACTIVATION_METHODS[func.__name__]
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
        out = op(x)
        if out is not x and getattr(module, "inplace", False):
            # an in-place activation mutates its input and the model may keep reading that tensor: sparsify it
            # in place too, so the activation mutates the tensor the model holds, as without the operator
            out = x.copy_(out)
        return (out, *args[1:])


class _ResetDispatch:
    """Root forward pre-hook: a new forward starts every activation's call count from zero."""

    def __init__(self, dispatches: list[_CallSiteDispatch]) -> None:
        self.dispatches = dispatches

    def __call__(self, module: nn.Module, args: tuple) -> None:
        for dispatch in self.dispatches:
            dispatch.next_call = 0


def _hook_candidate_sites(
    model: nn.Module, example_input: torch.Tensor, channel_dims: dict[str, int] | None, trace_error: str
) -> list[tuple[Site, nn.Module]]:
    records: list[tuple[str, nn.Module, tuple[int, ...]]] = []
    module_stack: list[str] = []
    spy = _FunctionalActivationSpy(module_stack)
    handles = []
    for path, module in model.named_modules():

        def push(m, args, path=path):
            module_stack.append(path)
            if _is_activation_module(m):
                spy.inside_activation += 1
                if args and isinstance(args[0], torch.Tensor):
                    records.append((path, m, tuple(args[0].shape)))

        def pop(m, args, output):
            module_stack.pop()
            if _is_activation_module(m):
                spy.inside_activation -= 1

        handles.append(module.register_forward_pre_hook(push))
        handles.append(module.register_forward_hook(pop))
    try:
        with _probe_mode(model), torch.no_grad(), spy:
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
    found: list[tuple[Site, nn.Module]] = []
    for path, module, shape in records:
        dim = _override_channel_dim(path, channel_dims)
        if dim is None:
            dim = _infer_channel_dim_from_shape(shape)
        found.append((Site(len(found), path, f"nn.{type(module).__name__}", shape, dim, shape[dim]), module))
    return found


# ----------------------------------------------------------------------------------------- selection
def _select(
    sites: list[Site],
    include: Sequence[str] | None,
    exclude: Sequence[str] | None,
    indices: Sequence[int] | None,
) -> list[Site]:
    if not sites:
        raise PlacementError(
            "no activation found in the model (modules, functional calls and Tensor methods were searched); "
            "register a custom activation with meansparse_pl.register_activation(MyActivation)."
        )
    selected = sites
    if include:
        for pattern in include:
            if not any(fnmatch.fnmatchcase(s.module_path, pattern) for s in sites):
                raise PlacementError(
                    f"include pattern {pattern!r} matches no activation site; run "
                    "meansparse_pl.find_sites(model, example_input) to see the module paths."
                )
        selected = [s for s in selected if any(fnmatch.fnmatchcase(s.module_path, p) for p in include)]
    if exclude:
        selected = [s for s in selected if not any(fnmatch.fnmatchcase(s.module_path, p) for p in exclude)]
    if indices is not None:
        bad = [i for i in indices if not 0 <= i < len(sites)]
        if bad:
            raise PlacementError(
                f"site indices {bad} out of range: the model has {len(sites)} activation sites."
            )
        wanted = set(indices)
        selected = [s for s in selected if s.index in wanted]
    if not selected:
        raise PlacementError("the include / exclude / site rules leave no activation site to sparsify.")
    return selected


def _prepare_input(model: nn.Module, example_input: torch.Tensor | Sequence[int]) -> torch.Tensor:
    if not isinstance(example_input, torch.Tensor):
        example_input = torch.zeros(1, *[int(s) for s in example_input])
    try:
        reference = next(model.parameters())
        example_input = example_input.to(device=reference.device, dtype=reference.dtype)
    except StopIteration:
        pass
    return example_input


# ------------------------------------------------------------------------------------------ public API
def find_sites(
    model: nn.Module,
    example_input: torch.Tensor | Sequence[int],
    *,
    strategy: Strategy = "auto",
    leaf_modules: Sequence[str] = (),
    channel_dims: dict[str, int] | None = None,
    preset: str = "activations",
) -> list[Site]:
    """Every site of the ``preset`` (default: every activation call) in forward order, without changing the model."""
    x = _prepare_input(model, example_input)
    return [site for site, _ in _candidates(model, x, strategy, leaf_modules, channel_dims, preset)[1]]


def _candidates(
    model: nn.Module,
    x: torch.Tensor,
    strategy: Strategy,
    leaf_modules: Sequence[str],
    channel_dims: dict[str, int] | None,
    preset_name: str = "activations",
) -> tuple[str, list[tuple[Site, Any]], fx.GraphModule | None]:
    if strategy not in ("auto", "fx", "hooks", "published"):
        raise ConfigurationError(f"strategy must be 'auto', 'fx', 'hooks' or 'published', got {strategy!r}.")
    if strategy == "published":
        from meansparse_pl.published import published_candidate_sites

        return "published", published_candidate_sites(model, x, channel_dims), None
    preset = get_preset(preset_name)
    only_activations = preset.name == "activations"
    if strategy == "hooks" and not only_activations:
        raise PlacementError(
            f"preset {preset.name!r} places operators after residual sums / modules, which only the fx "
            "strategy can reach; use strategy='auto' or 'fx'."
        )
    trace_error = "not tried"
    if strategy in ("auto", "fx"):
        try:
            gm = _trace(model, [*leaf_modules, *preset.after_modules])
        except Exception as error:  # fx raises many types (TraceError, TypeError, AttributeError, ...)
            trace_error = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
            if strategy == "fx" or not only_activations:
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
                return "fx", _fx_candidate_sites(gm, x, channel_dims), gm
            return "fx", _fx_preset_candidate_sites(gm, x, channel_dims, preset), gm
    return "hooks", _hook_candidate_sites(model, x, channel_dims, trace_error), None


def sparsify(
    model: nn.Module,
    example_input: torch.Tensor | Sequence[int],
    *,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    sites: Sequence[int] | None = None,
    alpha: float = 0.0,
    centre: Centre = "channel_mean",
    backward_mode: BackwardMode = "exact",
    strategy: Strategy = "auto",
    leaf_modules: Sequence[str] = (),
    channel_dims: dict[str, int] | None = None,
    preset: str = "activations",
    fuse_activations: bool = True,
) -> nn.Module:
    """Insert a MeanSparse operator at every selected site (by default: before every activation call).

    Args:
        model: any classifier; it is not copied: with the ``fx`` strategy the returned GraphModule shares its
            parameters, with ``hooks`` the model itself is modified and returned.
        example_input: a batch (or a shape without the batch dim) for the probe forward that finds the
            sites and their channel layout.
        include / exclude: fnmatch patterns on site module paths (e.g. ``exclude=["*.se.*"]`` skips
            squeeze-and-excitation blocks, as the paper does for RaWideResNet).
        sites: keep only these site indices (as listed by :func:`find_sites`), for the paper's single /
            cumulative / main-path / after-addition ablations.
        alpha, centre, backward_mode: operator settings, see :class:`MeanSparse`.
        strategy: ``auto`` (fx, falling back to hooks), ``fx``, ``hooks``, or ``published``: swap the
            published-style MeanSparse modules the model already contains for operators that take over
            their statistics and threshold (``alpha`` is then not used; see :mod:`meansparse_pl.published`).
        leaf_modules: fnmatch patterns of submodules fx should not trace into.
        channel_dims: fnmatch pattern -> channel axis, overriding the automatic layout detection.
        preset: the site rule, a name in :data:`PRESETS`: ``activations`` (the paper's "before every
            activation"), or ``published_wrn`` / ``published_convnext`` / ``published_swin`` for the sites
            of the released models (after residual sums, after MLP projections; fx only). Site indices
            (``sites``) count the preset's sites.
        fuse_activations: with ``fx``, an operator in front of a ReLU, ReLU6 or LeakyReLU call
            applies that activation itself and the call is dropped from the graph, so inference computes
            both in one elementwise pass. Values and state dict are the same either way; switch it off to
            keep hooks on activation modules that are added after placement.

    The operators are uncalibrated: run :func:`meansparse_pl.calibrate` before using the model.
    """
    check_alpha(alpha)
    if operators(model):
        raise PlacementError("the model already has MeanSparse operators; sparsify a model only once.")
    if strategy != "published":
        get_preset(preset)  # an unknown name fails before any work
    x = _prepare_input(model, example_input)
    source_keys = set(model.state_dict())
    used, candidates, gm = _candidates(model, x, strategy, leaf_modules, channel_dims, preset)
    selected = _select([s for s, _ in candidates], include, exclude, sites)
    chosen = {s.index for s in selected}
    placement = Placement(
        strategy=used,
        input_shape=tuple(x.shape[1:]),
        include=list(include) if include else None,
        exclude=list(exclude) if exclude else None,
        site_indices=list(sites) if sites is not None else None,
        channel_dims=dict(channel_dims) if channel_dims else None,
        leaf_modules=list(leaf_modules) or None,
        centre=centre,
        preset="published" if used == "published" else preset,
        fuse_activations=fuse_activations,
    )

    def make_operator(site: Site) -> tuple[MeanSparse, Site]:
        name = f"meansparse_{site.index}"
        # on the model's device (where the probe input was put): the buffers must live next to the features
        op = MeanSparse(site.num_channels, site.channel_dim, alpha, centre, backward_mode).to(x.device)
        op.site_name = _site_label(site)
        return op, Site(**{**asdict(site), "operator_name": name})

    fx_constants: tuple[str, ...] = ()
    if used == "published":
        from meansparse_pl.published import install_published_operators

        result: nn.Module = install_published_operators(model, candidates, chosen, centre, backward_mode)
        placement.sites.extend(site for site, _ in candidates if site.index in chosen)
    elif used == "fx":
        assert gm is not None
        # Tensors fx copies into the GraphModule as buffers (non-persistent buffers, plain tensor attributes)
        # appear in its state dict but not in the model's; exports to other formats leave them out.
        fx_constants = tuple(sorted(set(gm.state_dict()) - source_keys))
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
                    fused = _fuse_into_operator(node, sparsified, op, gm)
                    site = Site(**{**asdict(site), "fused_activation": fused})
            else:  # residual_add / after_module: the operator takes the node's output, every user reads it
                with gm.graph.inserting_after(node):
                    sparsified = gm.graph.call_module(site.operator_name, (node,))
                node.replace_all_uses_with(
                    sparsified, delete_user_cb=lambda user, op=sparsified: user is not op
                )
            placement.sites.append(site)
        gm.graph.lint()
        gm.recompile()
        result = gm
    else:
        per_module: dict[int, list[nn.Module]] = {}
        modules: dict[int, nn.Module] = {}
        for site, module in candidates:
            # every call of a module gets a slot so dispatch stays aligned with the call order; calls that
            # the rules leave out get an identity slot.
            slot: nn.Module = nn.Identity()
            if site.index in chosen:
                slot, site = make_operator(site)
                placement.sites.append(site)
            per_module.setdefault(id(module), []).append(slot)
            modules[id(module)] = module
        dispatches = []
        for key, slots in per_module.items():
            dispatch = _CallSiteDispatch(slots)
            modules[key].add_module("meansparse", dispatch)
            modules[key].register_forward_pre_hook(dispatch)
            dispatches.append(dispatch)
        model.register_forward_pre_hook(_ResetDispatch(dispatches))
        result = model
    result.meansparse_placement = placement
    result.meansparse_fx_constants = fx_constants
    if isinstance(result, fx.GraphModule):
        # GraphModule.__deepcopy__ rebuilds the module from its graph and keeps only the attributes listed here
        preserved = result.meta.setdefault("_user_preserved_attributes", {})
        preserved["meansparse_placement"] = placement
        preserved["meansparse_fx_constants"] = fx_constants
    return result


def sparsify_like(model: nn.Module, placement: Placement) -> nn.Module:
    """Rebuild the operators a placement record describes on a fresh instance of the same architecture.

    This is what loading a checkpoint must do: every field of the record, the preset included, goes back
    into :func:`sparsify`, so the same sites (and site indices) come back. Statistics and alpha are not in
    the record: load them with ``load_state_dict`` afterwards.
    """
    return sparsify(
        model,
        placement.input_shape,
        include=placement.include,
        exclude=placement.exclude,
        sites=placement.site_indices,
        centre=placement.centre,  # type: ignore[arg-type]
        strategy=placement.strategy,  # type: ignore[arg-type]
        leaf_modules=placement.leaf_modules or (),
        channel_dims=placement.channel_dims,
        preset="activations" if placement.strategy == "published" else placement.preset,
        fuse_activations=placement.fuse_activations,
    )


def placement_of(model: nn.Module) -> Placement:
    placement = getattr(model, "meansparse_placement", None)
    if placement is None:
        raise PlacementError("the model was not sparsified by meansparse_pl.sparsify (no placement record).")
    return placement


def _site_label(site: Site) -> str:
    """The operator's ``site_name``: used in error messages and by :func:`describe` to find the operator."""
    return f"site {site.index} ({site.call} in {site.module_path or 'model'})"


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
        op = by_label.get(_site_label(site))
        alpha = f"{float(op.alpha):g}" if op is not None else "?"
        calibrated = "yes" if op is not None and op.is_calibrated else "no"
        rows.append(
            f"| {site.index} | {site.module_path or '(root)'} | {site.call}"
            f"{' (fused)' if site.fused_activation else ''} | {site.channel_dim} | "
            f"{site.num_channels} | {tuple(site.input_shape)} | {alpha} | {calibrated} |"
        )
    return "\n".join(rows)
