"""The MeanSparse operator: mean-centred feature sparsification (Amini et al., 2024, eq. 7).

For channel ``c`` the operator outputs ``mu_c`` where ``|x - mu_c| < alpha * sigma_c`` and ``x`` elsewhere.
The comparison is strict and the threshold is computed as ``alpha * sqrt(var)`` exactly as in the published
RobustBench modules, so a published checkpoint reproduces its logits bit for bit.

Two backward modes exist because the operator masks gradients: ``exact`` (the true gradient, zero inside
the band) is what the model really computes; ``straight_through`` (identity backward, BPDA) is what an
adaptive attacker uses, and what every honest robustness number must also be measured with.

Speed. Eager PyTorch needs four elementwise passes for the formula (sub, abs, compare, select) plus a saved
boolean mask. On CPU, for inputs of at least :data:`FUSED_MIN_NUMEL` elements, the operator instead runs
one ``torch.compile``-d (inductor) kernel that evaluates the very same formula per element in a single pass
(the same IEEE operations in the same order, so the outputs are bit-identical; see tests/test_speed_paths.py),
and in ``exact`` mode recomputes the band in a fused backward kernel from the saved input instead of
storing a mask. The kernels write into output memory that is reused once nothing refers to it any more
(:class:`_OutputCache`): on CPU, first-touching freshly allocated memory costs more than the pass itself.
The band tensors ``centre`` and ``alpha * sqrt(var)`` are cached per input dtype, device and rank, and
rebuilt whenever a buffer changes. :func:`set_fused_kernels` (or ``MEANSPARSE_FUSED_KERNELS=0``) switches
the fused kernels off; inside ``torch.compile`` / ``torch.jit`` tracing the plain formula is used so the
surrounding compiler sees ordinary operations. Other devices use the eager formula.

Activation fusion. Even one pass is a read and a write of every activation, about 5% of a ResNet-18 forward on
CPU. Placement therefore hands the ReLU / ReLU6 / LeakyReLU that follows an operator to the operator itself
(:class:`FusedActivation`, ``sparsify(fuse_activations=True)``, the default): inference then computes
``relu(where(...))`` in the one kernel and the model's separate activation pass disappears. Only
piecewise-linear activations are fused, because only for them is the compiled kernel's value exactly the
eager one (GELU's ``erf`` differs in the last bit). With gradients the activation stays a separate autograd op.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import threading
import types
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from typing import Literal, NamedTuple

import torch
from torch import nn

from meansparse_pl.errors import (
    ConfigurationError,
    PlacementError,
    StatisticsError,
    UncalibratedOperatorError,
)

BackwardMode = Literal["exact", "straight_through"]
Centre = Literal["channel_mean", "zero", "global_mean"]
BACKWARD_MODES: tuple[str, ...] = ("exact", "straight_through")
CENTRES: tuple[str, ...] = ("channel_mean", "zero", "global_mean")


# ------------------------------------------------------------------------------------------- the formula
def _inside_band(x: torch.Tensor, centre: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """``|x - centre| < threshold``, strict, as the published modules compute it: the one band test that every
    path (eager, autograd Functions, fused kernels) uses. The difference is a fresh tensor, so ``abs_`` is safe."""
    return (x - centre).abs_() < threshold


def _band_select(
    x: torch.Tensor, centre: torch.Tensor, threshold: torch.Tensor, centre_out: torch.Tensor
) -> torch.Tensor:
    """The operator's output: ``centre_out`` inside the band, ``x`` elsewhere."""
    return torch.where(_inside_band(x, centre, threshold), centre_out, x)


# ------------------------------------------------------------------------------------------- eager path
class _ExactSparsify(torch.autograd.Function):
    """where(|x - centre| < threshold, centre, x) with the true gradient: zero inside the band.

    A hand-written backward keeps only a boolean mask for backward instead of autograd's saved inputs of
    sub/abs/lt/where, which is both lighter on memory and faster in eager mode.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, centre: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
        inside_band = _inside_band(x, centre, threshold)
        ctx.save_for_backward(inside_band)
        return torch.where(inside_band, centre.to(x.dtype), x)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (inside_band,) = ctx.saved_tensors
        return grad_output.masked_fill(inside_band, 0), None, None


class _StraightThroughSparsify(torch.autograd.Function):
    """Same forward; identity backward (BPDA, Athalye et al. 2018) so attacks see through the band."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, centre: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
        return _band_select(x, centre, threshold, centre.to(x.dtype))

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        return grad_output, None, None


_SPARSIFY_BY_MODE = {"exact": _ExactSparsify, "straight_through": _StraightThroughSparsify}


# ------------------------------------------------------------------------------------------- fused path
FUSED_MIN_NUMEL = 1 << 17
"""Inputs with fewer elements take the eager path: below this the compiled call's fixed cost dominates."""

_FUSED = {
    "enabled": os.environ.get("MEANSPARSE_FUSED_KERNELS", "1").strip().lower() not in ("0", "false", "no")
}
_COMPILED: dict[tuple, Callable] = {}


def set_fused_kernels(enabled: bool) -> bool:
    """Switch the fused CPU kernels on or off for this process; returns the previous setting.

    Both paths compute the same values bit for bit; the switch exists for benchmarking and as an escape hatch.
    """
    previous = _FUSED["enabled"]
    _FUSED["enabled"] = bool(enabled)
    return previous


def fused_kernels_enabled() -> bool:
    return _FUSED["enabled"]


@contextlib.contextmanager
def fused_kernels(enabled: bool) -> Iterator[None]:
    """Temporarily switch the fused kernels, e.g. ``with fused_kernels(False):`` for the eager reference."""
    previous = set_fused_kernels(enabled)
    try:
        yield
    finally:
        set_fused_kernels(previous)


def _sparsify_kernel(
    x: torch.Tensor,
    centre: torch.Tensor,
    threshold: torch.Tensor,
    centre_out: torch.Tensor,
    out: torch.Tensor,
) -> None:
    # the eager formula itself, in the promoted dtype: the compiled values are bit-identical to the eager ones
    out.copy_(_band_select(x, centre, threshold, centre_out))


def _make_sparsify_activate_kernel(activation: Callable[[torch.Tensor], torch.Tensor]) -> Callable:
    def sparsify_then_activate(
        x: torch.Tensor,
        centre: torch.Tensor,
        threshold: torch.Tensor,
        centre_out: torch.Tensor,
        out: torch.Tensor,
    ) -> None:
        # the eager formula, then the activation the operator stands in front of, in the same pass
        out.copy_(activation(_band_select(x, centre, threshold, centre_out)))

    return sparsify_then_activate


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


class FusedActivation(NamedTuple):
    """An activation the operator applies to its own output, so both run as one elementwise pass.

    Placement fuses only piecewise-linear activations (:data:`FUSABLE_ACTIVATIONS`): they need nothing but
    comparisons and one multiplication, so the fused kernel gives exactly the eager activation's values.
    """

    name: str  # e.g. "relu", "leaky_relu(negative_slope=0.1)"; also the compiled kernel's cache key
    fn: Callable[[torch.Tensor], torch.Tensor]


FUSABLE_ACTIVATIONS: dict[str, Callable[..., torch.Tensor]] = {
    "relu": torch.nn.functional.relu,
    "relu6": torch.nn.functional.relu6,
    "leaky_relu": torch.nn.functional.leaky_relu,
}


def fusable_activation(name: str, **kwargs: float) -> FusedActivation:
    """The :class:`FusedActivation` for ``name`` in :data:`FUSABLE_ACTIVATIONS` with its constant arguments."""
    function = FUSABLE_ACTIVATIONS.get(name)
    if function is None:
        raise ConfigurationError(
            f"activation {name!r} cannot be fused with the operator; fusable: {', '.join(FUSABLE_ACTIVATIONS)}."
        )
    if not kwargs:
        return FusedActivation(name, function)
    arguments = ", ".join(f"{key}={float(value)!r}" for key, value in sorted(kwargs.items()))
    return FusedActivation(f"{name}({arguments})", functools.partial(function, **kwargs))


_SPARSIFY_ACTIVATE_KERNELS: dict[str, Callable] = {}


def _sparsify_activate_kernel(activation: FusedActivation) -> Callable:
    kernel = _SPARSIFY_ACTIVATE_KERNELS.get(activation.name)
    if kernel is None:
        kernel = _SPARSIFY_ACTIVATE_KERNELS[activation.name] = _make_sparsify_activate_kernel(activation.fn)
    return kernel


def _exact_grad_kernel(
    x: torch.Tensor, centre: torch.Tensor, threshold: torch.Tensor, grad: torch.Tensor, out: torch.Tensor
) -> None:
    out.copy_(torch.where(_inside_band(x, centre, threshold), 0.0, grad))


def _compile(fn: Callable, variant: tuple) -> Callable:
    """``torch.compile`` of a private copy of ``fn`` for one input variant.

    Dynamo keeps its compiled graphs, and counts them against its recompile limit, per code object, and it
    specialises every size that is 0 or 1 and every dtype. Each variant (dtypes and which sizes are 1) gets
    a copy of ``fn`` with its own code object, so its shapes stay dynamic (one graph for every batch size and
    feature-map size) and no mix of models and dtypes in one process ever reaches the recompile limit.
    """
    name = f"{fn.__name__}_{len(_COMPILED)}"
    code = fn.__code__.replace(co_name=name)  # a distinct code object: its own dynamo cache
    clone = types.FunctionType(code, fn.__globals__, name, fn.__defaults__, fn.__closure__)
    return torch.compile(clone, dynamic=True, fullgraph=True)


def _run_compiled(fn: Callable, *args: torch.Tensor) -> tuple[bool, object]:
    """Run ``fn`` as a fused kernel: ``(True, its result)``, or ``(False, None)`` (and the fused path switched
    off, with one warning) if compiling or running it fails."""
    variant = tuple((a.dtype, tuple(size == 1 for size in a.shape)) for a in args)
    key = (fn, variant)  # the function object itself: kernels made per activation share a qualname
    compiled = _COMPILED.get(key)
    try:
        if compiled is None:
            compiled = _COMPILED[key] = _compile(fn, variant)
        with torch.no_grad():  # one grad mode for every call: dynamo guards on it
            return True, compiled(*args)
    except Exception as error:  # no C++ compiler, an unsupported dtype, ...: the eager path is just as exact
        _FUSED["enabled"] = False
        warnings.warn(
            f"MeanSparse: a fused CPU kernel failed ({type(error).__name__}: {str(error)[:200]}); "
            "falling back to the eager implementation (same values, slower).",
            RuntimeWarning,
            stacklevel=3,
        )
        return False, None


def _tracing() -> bool:
    return torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.jit.is_scripting()


class _Band(NamedTuple):
    """The band of one operator for one input dtype and rank (see ``MeanSparse._band``)."""

    centre: torch.Tensor  # comparison dtype, shaped to broadcast against the input
    threshold: torch.Tensor  # alpha * sqrt(var), comparison dtype, same shape
    centre_out: torch.Tensor  # the centre in the input dtype: what replaces values inside the band
    flat: tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # the three as fresh (1, C, 1) tensors


def _alias(t: torch.Tensor, size: Sequence[int], stride: Sequence[int]) -> torch.Tensor:
    """A tensor over ``t``'s memory with the given geometry that is *not* a view of ``t``.

    The compiled kernels get these instead of ``view``s: dynamo guards on the sizes of a view's base (which
    would recompile on every new feature-map size), and a custom autograd Function may not return a view
    (an in-place activation after the operator would then be refused).
    """
    with torch.no_grad():
        return t.new_empty(0).set_(t.untyped_storage(), t.storage_offset(), tuple(size), tuple(stride))


def _canonical(t: torch.Tensor, channel_dim: int) -> tuple[torch.Tensor, bool] | None:
    """``t`` as a contiguous ``(outer, C, inner)`` tensor over the same memory, or None for other layouts.

    Contiguous tensors of any rank map directly; channels-last 4-D tensors map through their NHWC order to
    ``(N*H*W, C, 1)``. The flag says which of the two it was.
    """
    dim = channel_dim % t.dim()
    channels = t.shape[dim]
    if t.is_contiguous():
        outer, inner = math.prod(t.shape[:dim]), math.prod(t.shape[dim + 1 :])
        return _alias(t, (outer, channels, inner), (channels * inner, inner, 1)), False
    if t.dim() == 4 and dim == 1 and t.is_contiguous(memory_format=torch.channels_last):
        return _alias(t, (t.numel() // channels, channels, 1), (channels, 1, 1)), True
    return None


class _OutputCache:
    """Reusable output memory for the fused kernels, like a (tiny) caching allocator.

    Each fused call writes a tensor as large as its input. On CPU a fresh allocation of that size is usually
    new memory from the operating system, and touching it for the first time (page faults, zeroing by the
    kernel) costs several times the arithmetic of the pass itself. The cache keeps up to ``per_geometry``
    tensors for each of the ``geometries`` most recently used (shape, stride, dtype) combinations and hands
    one out only when nothing else holds its memory any more: the storage's reference count shows that every
    tensor the cache ever returned over it (and every view, ``.numpy()`` array or autograd saved tensor of
    those) has been freed. What a caller gets is a fresh tensor over that memory, so holding on to an output
    keeps its memory out of circulation. Values never depend on the cache; only where they are written does.
    """

    def __init__(self, geometries: int = 8, per_geometry: int = 2) -> None:
        self.geometries = geometries
        self.per_geometry = per_geometry
        self._lock = threading.Lock()
        self._buffers: OrderedDict[tuple, list[tuple[torch.Tensor, int]]] = OrderedDict()

    @staticmethod
    def _references(t: torch.Tensor) -> int:
        return torch._C._storage_Use_Count(t.untyped_storage()._cdata)

    def empty_like(self, x: torch.Tensor) -> torch.Tensor:
        """An uninitialised tensor with ``x``'s shape, strides, dtype and device."""
        size, stride = tuple(x.shape), tuple(x.stride())
        if self.per_geometry < 1:
            return torch.empty_strided(size, stride, dtype=x.dtype, device=x.device)
        key = (size, stride, x.dtype, x.device)
        with self._lock:  # check and hand out atomically: two threads never get the same memory
            buffers = self._buffers.get(key)
            if buffers is None:
                buffers = self._buffers[key] = []
                while len(self._buffers) > self.geometries:
                    self._buffers.popitem(last=False)
            else:
                self._buffers.move_to_end(key)
            for buffer, idle in buffers:
                if self._references(buffer) == idle:
                    return _alias(buffer, size, stride)
            if len(buffers) >= self.per_geometry:
                return torch.empty_strided(size, stride, dtype=x.dtype, device=x.device)
            with torch.inference_mode(False):  # a plain tensor, reusable in and out of inference mode
                buffer = torch.empty_strided(size, stride, dtype=x.dtype, device=x.device)
            buffers.append((buffer, self._references(buffer)))  # the count while only the cache holds it
            return _alias(buffer, size, stride)

    def clear(self) -> None:
        with self._lock:
            self._buffers.clear()


_OUTPUTS = _OutputCache()


def release_cached_outputs() -> None:
    """Free the output memory the fused kernels keep for reuse (see ``_OutputCache``)."""
    _OUTPUTS.clear()


def _fused_applicable(x: torch.Tensor) -> bool:
    return (
        _FUSED["enabled"]
        and x.device.type == "cpu"
        and x.numel() >= max(FUSED_MIN_NUMEL, 1)
        and x.dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16)
    )


def _fused_forward(
    x: torch.Tensor, band: _Band, channel_dim: int, activation: FusedActivation | None = None
) -> torch.Tensor | None:
    """The fused kernel on ``x`` (followed by ``activation`` in the same pass); None for an unmapped layout or
    a failed kernel."""
    mapped = _canonical(x, channel_dim)
    if mapped is None:
        return None
    out = _OUTPUTS.empty_like(x)
    out3 = _canonical(out, channel_dim)
    assert out3 is not None and out3[1] == mapped[1]  # same geometry as x
    kernel = _sparsify_kernel if activation is None else _sparsify_activate_kernel(activation)
    ok, _ = _run_compiled(kernel, mapped[0], *band.flat, out3[0])
    return out if ok else None


def _eager_forward(x: torch.Tensor, band: _Band) -> torch.Tensor:
    return _band_select(x, band.centre, band.threshold, band.centre_out)


class _FusedExactSparsify(torch.autograd.Function):
    """Fused forward; the backward recomputes the band test from the saved input in one fused pass, so no
    mask is stored (the input is kept alive instead: it is usually freed right after the operator)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, band: _Band, channel_dim: int) -> torch.Tensor:
        ctx.band, ctx.channel_dim = band, channel_dim
        out = _fused_forward(x, band, channel_dim)
        if out is None:  # the kernel failed: the eager formula with a saved mask
            inside_band = _inside_band(x, band.centre, band.threshold)
            ctx.save_for_backward(inside_band)
            ctx.fused = False
            return torch.where(inside_band, band.centre_out, x)
        ctx.save_for_backward(x)
        ctx.fused = True
        return out

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        band = ctx.band
        if not ctx.fused:
            (inside_band,) = ctx.saved_tensors
            return grad_output.masked_fill(inside_band, 0), None, None
        (x,) = ctx.saved_tensors
        x3, channels_last = _canonical(x, ctx.channel_dim)  # type: ignore[misc]  # mapped in forward
        grad = grad_output.contiguous(
            memory_format=torch.channels_last if channels_last else torch.contiguous_format
        )
        grad3 = _canonical(grad, ctx.channel_dim)
        if grad3 is not None and grad3[1] == channels_last and grad.dtype == x.dtype:
            grad_input = _OUTPUTS.empty_like(grad)
            ok, _ = _run_compiled(
                _exact_grad_kernel,
                x3,
                band.flat[0],
                band.flat[1],
                grad3[0],
                _canonical(grad_input, ctx.channel_dim)[0],  # type: ignore[index]
            )
            if ok:
                return grad_input, None, None
        inside_band = _inside_band(x, band.centre, band.threshold)
        return grad_output.masked_fill(inside_band, 0), None, None


class _FusedStraightThroughSparsify(torch.autograd.Function):
    """Fused forward; identity backward, nothing saved."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, band: _Band, channel_dim: int) -> torch.Tensor:
        out = _fused_forward(x, band, channel_dim)
        return _eager_forward(x, band) if out is None else out

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        return grad_output, None, None


_FUSED_BY_MODE = {"exact": _FusedExactSparsify, "straight_through": _FusedStraightThroughSparsify}


def check_alpha(alpha: float) -> float:
    """Validate one alpha value; the single place where the rule `alpha >= 0, finite` lives."""
    alpha = float(alpha)
    if not (alpha >= 0.0) or alpha == float("inf"):
        raise ConfigurationError(
            f"alpha must be a finite number >= 0, got {alpha}; use 0 to switch MeanSparse off."
        )
    return alpha


class MeanSparse(nn.Module):
    """Mean-centred sparsification of one activation's input, per channel.

    Args:
        num_channels: number of channels ``C`` at this site.
        channel_dim: the axis that holds the channels: ``1`` for ``(N, C, ...)`` conv features, ``-1`` for
            ``(N, L, C)`` / ``(N, H, W, C)`` features of transformer and ConvNeXt MLPs.
        alpha: band half-width in units of the channel's standard deviation; 0 makes the operator the
            identity (after calibration).
        centre: reference the band is centred on (paper A.7): the channel mean (default), zero, or the mean
            over all channels.
        backward_mode: ``exact`` or ``straight_through``; see the module docstring.
        activation: the activation this operator stands in front of, when placement has fused the two (see
            :class:`FusedActivation`): the operator then returns ``activation(sparsified x)`` and the model no
            longer calls the activation itself. Inference runs both in one pass; it holds no state, so the
            state dict is the same with or without it.

    Buffers ``mean``, ``var`` (population variance over every element of the calibration set), ``count``
    (elements per channel seen) and ``alpha`` travel in the state dict.
    """

    def __init__(
        self,
        num_channels: int,
        channel_dim: int = 1,
        alpha: float = 0.0,
        centre: Centre = "channel_mean",
        backward_mode: BackwardMode = "exact",
        activation: FusedActivation | None = None,
    ) -> None:
        super().__init__()
        if num_channels < 1:
            raise ConfigurationError(f"num_channels must be >= 1, got {num_channels}.")
        if centre not in CENTRES:
            raise ConfigurationError(f"centre must be one of {CENTRES}, got {centre!r}.")
        if backward_mode not in BACKWARD_MODES:
            raise ConfigurationError(f"backward_mode must be one of {BACKWARD_MODES}, got {backward_mode!r}.")
        self.num_channels = int(num_channels)
        self.channel_dim = int(channel_dim)
        self.centre = centre
        self.backward_mode: BackwardMode = backward_mode
        self.activation = activation
        self.site_name = ""  # set by placement, used in error messages
        self.register_buffer("mean", torch.zeros(num_channels))
        self.register_buffer("var", torch.ones(num_channels))
        # int64: model.half() must not turn a count of millions of elements into float16 inf
        self.register_buffer("count", torch.zeros((), dtype=torch.int64))
        self.register_buffer("alpha", torch.tensor(check_alpha(alpha)))
        # Host-side copies of alpha and "calibrated", so forward never reads a device tensor (a GPU sync and
        # a torch.compile graph break per operator per call). Kept in step by set_alpha, set_statistics and
        # state-dict loading; write the buffers only through those.
        self._alpha_value = float(self.alpha)
        self._calibrated = False
        # While calibration runs, an observer sees every input and the operator passes it through untouched.
        self._observer: Callable[[torch.Tensor], None] | None = None
        # (input dtype, device, rank) -> (buffer token, band tensors); see _band
        self._band_cache: dict[tuple, tuple[tuple, _Band]] = {}

    # ----------------------------------------------------------------------------------------- state
    def __getstate__(self) -> dict:
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__
        return {**state, "_band_cache": {}}  # copies and pickles rebuild the band on first use

    @property
    def is_calibrated(self) -> bool:
        return self._calibrated

    def set_alpha(self, alpha: float) -> None:
        self.alpha.fill_(check_alpha(alpha))
        self._alpha_value = float(self.alpha)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._alpha_value = float(self.alpha)
        self._calibrated = bool(self.count > 0)

    def set_statistics(self, mean: torch.Tensor, var: torch.Tensor, count: float) -> None:
        """Install channel statistics (from calibration or a checkpoint), validating them first."""
        where = self.site_name or "a MeanSparse operator"
        for name, value in (("mean", mean), ("var", var)):
            if value.shape != (self.num_channels,):
                raise StatisticsError(
                    f"{where}: {name} has shape {tuple(value.shape)} but the site has {self.num_channels} "
                    "channels; the statistics belong to a different model or placement."
                )
            if not torch.isfinite(value).all():
                raise StatisticsError(
                    f"{where}: channel {name} contains NaN or Inf (diverged model or bad input data); "
                    "check the data and the model's outputs before calibrating."
                )
        if (var < 0).any():
            raise StatisticsError(f"{where}: negative variance; the statistics are corrupt.")
        self.mean.copy_(mean.to(self.mean))
        self.var.copy_(var.to(self.var))
        self.count.fill_(int(round(float(count))))
        self._calibrated = bool(self.count > 0)

    # --------------------------------------------------------------------------------------- forward
    def _band_is_current(self, entry: tuple) -> bool:
        """Whether a cache entry was built from the very buffers the operator holds now, unchanged since.

        The entry keeps the buffer objects themselves (compared by identity, so a replaced buffer can never be
        mistaken for the old one) and their version counters (bumped by every in-place write: set_alpha,
        set_statistics, load_state_dict, a user's ``copy_``)."""
        buffers, versions, settings = entry
        return (
            buffers[0] is self.mean
            and buffers[1] is self.var
            and buffers[2] is self.alpha
            and versions == (self.mean._version, self.var._version, self.alpha._version)
            and settings == (self._alpha_value, self.centre, self.channel_dim, self.num_channels)
        )

    def _band(self, x: torch.Tensor) -> _Band:
        """The band tensors for ``x``'s dtype, device and rank, cached between calls (see ``_Band``)."""
        if _tracing():
            return self._build_band(x)
        key = (x.dtype, x.device, x.dim())
        cached = self._band_cache.get(key)
        try:
            if cached is not None and self._band_is_current(cached[0]):
                return cached[1]
            versions = (self.mean._version, self.var._version, self.alpha._version)
        except RuntimeError:  # buffers created under inference_mode have no version counter: no caching
            return self._build_band(x)
        # Plain tensors even when the first call runs under inference_mode / no_grad: the cache is reused by
        # later calls that record gradients and save these tensors for backward.
        with torch.inference_mode(False), torch.no_grad():
            band = self._build_band(x)
        entry = (
            (self.mean, self.var, self.alpha),
            versions,
            (self._alpha_value, self.centre, self.channel_dim, self.num_channels),
        )
        self._band_cache[key] = (entry, band)
        return band

    def _build_band(self, x: torch.Tensor) -> _Band:
        centre, threshold = self._compute_centre_and_threshold(x)
        centre_out = centre.to(x.dtype)
        if _tracing():
            return _Band(centre, threshold, centre_out, (centre, threshold, centre_out))
        flat = tuple(t.reshape(1, self.num_channels, 1).clone() for t in (centre, threshold, centre_out))
        return _Band(centre, threshold, centre_out, flat)  # type: ignore[arg-type]

    def _compute_centre_and_threshold(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        threshold = self.alpha * torch.sqrt(self.var)
        if self.centre == "channel_mean":
            centre = self.mean
        elif self.centre == "zero":
            centre = torch.zeros_like(self.mean)
        else:
            centre = self.mean.mean().expand_as(self.mean)
        shape = [1] * x.dim()
        shape[self.channel_dim] = self.num_channels
        # The band test runs in the wider of the input and buffer dtypes (float32 for half / bfloat16 inputs), so
        # a low-precision input gets exactly the float32 decision; only the output is in the input dtype.
        dtype = torch.promote_types(x.dtype, self.mean.dtype)
        return centre.to(dtype).view(shape), threshold.to(dtype).view(shape)

    def _centre_and_threshold(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The band for ``x``: centre and half-width, in the comparison dtype, shaped to broadcast."""
        band = self._band(x)
        return band.centre, band.threshold

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._forward(x, self.activation)

    def without_activation(self, x: torch.Tensor) -> torch.Tensor:
        """The operator's own output, without the activation placement may have fused into it (for plots
        and analyses of the band itself)."""
        return self._forward(x, None)

    def _forward(self, x: torch.Tensor, activation: FusedActivation | None) -> torch.Tensor:
        activate = _identity if activation is None else activation.fn
        if self._observer is not None:
            self._observer(x)
            return activate(x)
        if x.shape[self.channel_dim] != self.num_channels:
            raise ConfigurationError(
                f"{self.site_name or 'MeanSparse'}: input has {x.shape[self.channel_dim]} channels on dim "
                f"{self.channel_dim}, the operator was built for {self.num_channels}; re-run sparsify on "
                "this architecture."
            )
        if not self.is_calibrated:
            raise UncalibratedOperatorError(
                f"{self.site_name or 'MeanSparse operator'} has no channel statistics; run "
                "meansparse_pl.calibrate(model, train_loader) (or `cli.py postprocess`) before using it."
            )
        if self._alpha_value == 0.0:
            return activate(x)
        band = self._band(x)
        if _tracing():  # torch.compile / jit see the plain formula inside an autograd.Function
            return activate(_SPARSIFY_BY_MODE[self.backward_mode].apply(x, band.centre, band.threshold))
        fused = _fused_applicable(x) and _canonical(x, self.channel_dim) is not None
        if not (x.requires_grad and torch.is_grad_enabled()):  # inference: no autograd Function needed
            out = _fused_forward(x, band, self.channel_dim, activation) if fused else None
            return activate(_eager_forward(x, band)) if out is None else out
        # With gradients the activation stays a separate autograd op: its backward is then autograd's own in
        # both backward modes (the attack path already costs little next to the backward pass).
        if fused:
            return activate(_FUSED_BY_MODE[self.backward_mode].apply(x, band, self.channel_dim))
        return activate(_SPARSIFY_BY_MODE[self.backward_mode].apply(x, band.centre, band.threshold))

    def extra_repr(self) -> str:
        return (
            f"channels={self.num_channels}, channel_dim={self.channel_dim}, alpha={float(self.alpha):g}, "
            f"centre={self.centre}, backward={self.backward_mode}, calibrated={self.is_calibrated}"
            + (f", then {self.activation.name}" if self.activation is not None else "")
        )


# ------------------------------------------------------------------------------------ whole-model helpers
def operators(model: nn.Module) -> list[MeanSparse]:
    """Every MeanSparse operator in ``model``, in registration order."""
    return [m for m in model.modules() if isinstance(m, MeanSparse)]


def _require_operators(model: nn.Module) -> list[MeanSparse]:
    found = operators(model)
    if not found:
        raise PlacementError(
            "the model has no MeanSparse operators; run meansparse_pl.sparsify(model, example_input) first."
        )
    return found


def set_alpha(model: nn.Module, alpha: float) -> None:
    """Set the one shared alpha of every operator in ``model``."""
    alpha = check_alpha(alpha)
    for op in _require_operators(model):
        op.set_alpha(alpha)


def get_alpha(model: nn.Module) -> float:
    values = {float(op.alpha) for op in _require_operators(model)}
    if len(values) != 1:
        raise ConfigurationError(
            f"operators carry different alpha values {sorted(values)}; set one with set_alpha."
        )
    return values.pop()


def set_backward_mode(model: nn.Module, mode: BackwardMode) -> None:
    if mode not in BACKWARD_MODES:
        raise ConfigurationError(f"backward mode must be one of {BACKWARD_MODES}, got {mode!r}.")
    for op in operators(model):
        op.backward_mode = mode


@contextlib.contextmanager
def backward_mode(model: nn.Module, mode: BackwardMode) -> Iterator[nn.Module]:
    """Temporarily switch every operator's backward, e.g. ``with backward_mode(m, "straight_through"):``."""
    previous = [(op, op.backward_mode) for op in operators(model)]
    set_backward_mode(model, mode)
    try:
        yield model
    finally:
        for op, old in previous:
            op.backward_mode = old
