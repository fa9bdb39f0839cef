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
"""

from __future__ import annotations

import contextlib
import fnmatch
import inspect
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
from meansparse_pl.operator import BackwardMode, Centre, MeanSparse, check_alpha, operators

Strategy = Literal["auto", "fx", "hooks"]

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
) -> list[Site]:
    """Every activation call site of ``model`` in forward order, without changing the model."""
    x = _prepare_input(model, example_input)
    return [site for site, _ in _candidates(model, x, strategy, leaf_modules, channel_dims)[1]]


def _candidates(
    model: nn.Module,
    x: torch.Tensor,
    strategy: Strategy,
    leaf_modules: Sequence[str],
    channel_dims: dict[str, int] | None,
) -> tuple[str, list[tuple[Site, Any]], fx.GraphModule | None]:
    if strategy not in ("auto", "fx", "hooks"):
        raise ConfigurationError(f"strategy must be 'auto', 'fx' or 'hooks', got {strategy!r}.")
    trace_error = "not tried"
    if strategy in ("auto", "fx"):
        try:
            gm = _trace(model, leaf_modules)
        except Exception as error:  # fx raises many types (TraceError, TypeError, AttributeError, ...)
            trace_error = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
            if strategy == "fx":
                raise PlacementError(
                    f"torch.fx cannot trace this model ({trace_error}); list the untraceable submodule in "
                    "leaf_modules=[...] or use strategy='hooks'."
                ) from error
        else:
            return "fx", _fx_candidate_sites(gm, x, channel_dims), gm
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
) -> nn.Module:
    """Insert a MeanSparse operator before every selected activation call site.

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
        strategy: ``auto`` (fx, falling back to hooks), ``fx`` or ``hooks``.
        leaf_modules: fnmatch patterns of submodules fx should not trace into.
        channel_dims: fnmatch pattern -> channel axis, overriding the automatic layout detection.

    The operators are uncalibrated: run :func:`meansparse_pl.calibrate` before using the model.
    """
    check_alpha(alpha)
    if operators(model):
        raise PlacementError("the model already has MeanSparse operators; sparsify a model only once.")
    x = _prepare_input(model, example_input)
    used, candidates, gm = _candidates(model, x, strategy, leaf_modules, channel_dims)
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
    )

    def make_operator(site: Site) -> tuple[MeanSparse, Site]:
        name = f"meansparse_{site.index}"
        # on the model's device (where the probe input was put): the buffers must live next to the features
        op = MeanSparse(site.num_channels, site.channel_dim, alpha, centre, backward_mode).to(x.device)
        op.site_name = _site_label(site)
        return op, Site(**{**asdict(site), "operator_name": name})

    if used == "fx":
        assert gm is not None
        for site, node in candidates:
            if site.index not in chosen:
                continue
            op, site = make_operator(site)
            gm.add_submodule(site.operator_name, op)
            source = node.args[0]
            if _is_inplace(node, gm):
                _redirect_later_uses(source, node)
            with gm.graph.inserting_before(node):
                sparsified = gm.graph.call_module(site.operator_name, (source,))
            node.update_arg(0, sparsified)
            placement.sites.append(site)
        gm.graph.lint()
        gm.recompile()
        result: nn.Module = gm
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
    if isinstance(result, fx.GraphModule):
        # GraphModule.__deepcopy__ rebuilds the module from its graph and keeps only the attributes listed here
        result.meta.setdefault("_user_preserved_attributes", {})["meansparse_placement"] = placement
    return result


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
            f"| {site.index} | {site.module_path or '(root)'} | {site.call} | {site.channel_dim} | "
            f"{site.num_channels} | {tuple(site.input_shape)} | {alpha} | {calibrated} |"
        )
    return "\n".join(rows)
