"""Fused kernels for the operator and the statistics pass (``torch.compile`` / inductor: C++ on CPU, Triton on
CUDA).

Eager PyTorch needs four elementwise passes for the MeanSparse formula (sub, abs, compare, select) plus a saved
boolean mask. On CPU and CUDA, for inputs of at least :data:`FUSED_MIN_NUMEL` elements, the operator instead runs one
compiled kernel that evaluates the very same formula per element in a single pass (the same IEEE operations in
the same order, so the outputs are bit-identical; see tests/test_speed_paths.py), and in ``exact`` mode
recomputes the band in a fused backward kernel from the saved input instead of storing a mask. The kernels
write into output memory that is reused once nothing refers to it any more (:class:`OutputCache`): on CPU,
first-touching freshly allocated memory costs more than the pass itself. :func:`set_fused_kernels` (or
``MEANSPARSE_FUSED_KERNELS=0``) switches the fused kernels off; inside ``torch.compile`` / ``torch.jit``
tracing the plain formula is used so the surrounding compiler sees ordinary operations. Other devices, and CUDA
without Triton, use the eager formula; where a kernel cannot be compiled on a device, that device falls back to
the eager formula with one warning (the values are the same).

Activation fusion. Even one pass is a read and a write of every activation, about 5% of a ResNet-18 forward on
CPU. Placement therefore hands the ReLU / ReLU6 / LeakyReLU that follows an operator to the operator itself
(:class:`FusedActivation`): inference then computes ``relu(where(...))`` in the one kernel. Only
piecewise-linear activations are fused, because only for them is the compiled kernel's value exactly the eager
one (GELU's ``erf`` differs in the last bit).

Callers reach :func:`run_compiled` and :data:`FUSED_MIN_NUMEL` through this module (``kernels.run_compiled``),
so a test or benchmark that swaps them here affects every fused path.
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
from typing import NamedTuple

import torch

from meansparse_pl.errors import ConfigurationError
from meansparse_pl.ops.band import Band, band_select, inside_band

FUSED_MIN_NUMEL = 1 << 17
"""Inputs with fewer elements take the eager path: below this the compiled call's fixed cost dominates."""

_FUSED = {
    "enabled": os.environ.get("MEANSPARSE_FUSED_KERNELS", "1").strip().lower() not in ("0", "false", "no")
}
FUSED_DEVICE_TYPES = ("cpu", "cuda")
"""Device types with fused kernels (inductor's C++ backend on CPU, Triton on CUDA)."""
_FAILED_DEVICE_TYPES: set[str] = set()  # a kernel failed to compile or run there: eager from then on
_COMPILED: dict[tuple, Callable] = {}


def set_fused_kernels(enabled: bool) -> bool:
    """Switch the fused CPU kernels on or off for this process; returns the previous setting.

    Both paths compute the same values bit for bit; the switch exists for benchmarking and as an escape hatch.
    Switching on also retries the device types where a kernel had failed.
    """
    previous = _FUSED["enabled"]
    _FUSED["enabled"] = bool(enabled)
    if enabled:
        _FAILED_DEVICE_TYPES.clear()
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
    out.copy_(band_select(x, centre, threshold, centre_out))


def _make_sparsify_activate_kernel(activation: Callable[[torch.Tensor], torch.Tensor]) -> Callable:
    def sparsify_then_activate(
        x: torch.Tensor,
        centre: torch.Tensor,
        threshold: torch.Tensor,
        centre_out: torch.Tensor,
        out: torch.Tensor,
    ) -> None:
        # the eager formula, then the activation the operator stands in front of, in the same pass
        out.copy_(activation(band_select(x, centre, threshold, centre_out)))

    return sparsify_then_activate


class FusedActivation(NamedTuple):
    """An activation the operator applies to its own output, so both run as one elementwise pass.

    Placement fuses only piecewise-linear activations (:data:`FUSABLE_ACTIVATIONS`): they need nothing but
    comparisons and one multiplication, so the fused kernel gives exactly the eager activation's values.
    """

    name: str  # e.g. "relu", "leaky_relu(negative_slope=0.1)"; also the compiled kernel's cache key
    fn: Callable[..., torch.Tensor]  # takes the tensor (and ``inplace=True`` to overwrite it)
    # the model applied it in place: while statistics are collected the operator does too, so the calibration
    # pass allocates no activation memory the model itself did not (fresh memory costs more than the pass)
    inplace: bool = False

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """The activation as the model applied it: in place where the model's own call was."""
        return self.fn(x, inplace=True) if self.inplace else self.fn(x)


FUSABLE_ACTIVATIONS: dict[str, Callable[..., torch.Tensor]] = {
    "relu": torch.nn.functional.relu,
    "relu6": torch.nn.functional.relu6,
    "leaky_relu": torch.nn.functional.leaky_relu,
}


def fusable_activation(name: str, *, inplace: bool = False, **kwargs: float) -> FusedActivation:
    """The :class:`FusedActivation` for ``name`` in :data:`FUSABLE_ACTIVATIONS` with its constant arguments;
    ``inplace`` says the model's own call overwrote its input."""
    function = FUSABLE_ACTIVATIONS.get(name)
    if function is None:
        raise ConfigurationError(
            f"activation {name!r} cannot be fused with the operator; fusable: {', '.join(FUSABLE_ACTIVATIONS)}."
        )
    if not kwargs:
        return FusedActivation(name, function, inplace)
    arguments = ", ".join(f"{key}={float(value)!r}" for key, value in sorted(kwargs.items()))
    return FusedActivation(f"{name}({arguments})", functools.partial(function, **kwargs), inplace)


_SPARSIFY_ACTIVATE_KERNELS: dict[str, Callable] = {}


def _sparsify_activate_kernel(activation: FusedActivation) -> Callable:
    kernel = _SPARSIFY_ACTIVATE_KERNELS.get(activation.name)
    if kernel is None:
        kernel = _SPARSIFY_ACTIVATE_KERNELS[activation.name] = _make_sparsify_activate_kernel(activation.fn)
    return kernel


def _exact_grad_kernel(
    x: torch.Tensor, centre: torch.Tensor, threshold: torch.Tensor, grad: torch.Tensor, out: torch.Tensor
) -> None:
    out.copy_(torch.where(inside_band(x, centre, threshold), 0.0, grad))


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


def run_compiled(fn: Callable, *args: torch.Tensor) -> tuple[bool, object]:
    """Run ``fn`` as a fused kernel: ``(True, its result)``, or ``(False, None)`` (and the fused path switched
    off on that device type, with one warning) if compiling or running it fails."""
    variant = tuple((a.dtype, tuple(size == 1 for size in a.shape)) for a in args)
    key = (fn, variant)  # the function object itself: kernels made per activation share a qualname
    compiled = _COMPILED.get(key)
    try:
        if compiled is None:
            compiled = _COMPILED[key] = _compile(fn, variant)
        with torch.no_grad():  # one grad mode for every call: dynamo guards on it
            return True, compiled(*args)
    except Exception as error:  # no C++ compiler / Triton, an unsupported dtype, ...: eager is just as exact
        device_type = args[0].device.type
        _FAILED_DEVICE_TYPES.add(device_type)
        warnings.warn(
            f"MeanSparse: a fused {device_type} kernel failed ({type(error).__name__}: {str(error)[:200]}); "
            f"falling back to the eager implementation on {device_type} (same values, slower).",
            RuntimeWarning,
            stacklevel=3,
        )
        return False, None


def tracing() -> bool:
    return torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.jit.is_scripting()


def transformed() -> bool:
    """Whether a ``torch.func`` transform (grad, vmap, jacrev, ...) is active: the eager Functions run then."""
    return torch._C._are_functorch_transforms_active()


@functools.cache
def _has_triton() -> bool:
    try:
        from torch.utils._triton import has_triton
    except ImportError:  # pragma: no cover - every supported torch has it
        return False
    return bool(has_triton())


def fused_device(device: torch.device) -> bool:
    """Whether the fused kernels are used on ``device`` (switch on, a supported type, nothing failed there)."""
    kind = device.type
    if not _FUSED["enabled"] or kind not in FUSED_DEVICE_TYPES or kind in _FAILED_DEVICE_TYPES:
        return False
    return kind == "cpu" or _has_triton()


def kernel_path(device: torch.device | str) -> str:
    """``"fused"`` or ``"eager"``: which implementation large inputs on ``device`` take now (for reports)."""
    return "fused" if fused_device(torch.device(device)) else "eager"


def _alias(t: torch.Tensor, size: Sequence[int], stride: Sequence[int]) -> torch.Tensor:
    """A tensor over ``t``'s memory with the given geometry that is *not* a view of ``t``.

    The compiled kernels get these instead of ``view``s: dynamo guards on the sizes of a view's base (which
    would recompile on every new feature-map size), and a custom autograd Function may not return a view
    (an in-place activation after the operator would then be refused).
    """
    with torch.no_grad():
        return t.new_empty(0).set_(t.untyped_storage(), t.storage_offset(), tuple(size), tuple(stride))


def canonical(t: torch.Tensor, channel_dim: int) -> tuple[torch.Tensor, bool] | None:
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


class OutputCache:
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
        # accelerators have caching allocators of their own
        if self.per_geometry < 1 or x.device.type != "cpu":
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


OUTPUTS = OutputCache()


def release_cached_outputs() -> None:
    """Free the output memory the fused kernels keep for reuse (see ``OutputCache``)."""
    OUTPUTS.clear()


def fused_applicable(x: torch.Tensor) -> bool:
    return (
        fused_device(x.device)
        and x.numel() >= max(FUSED_MIN_NUMEL, 1)
        and x.dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16)
    )


def fused_forward(
    x: torch.Tensor, band: Band, channel_dim: int, activation: FusedActivation | None = None
) -> torch.Tensor | None:
    """The fused kernel on ``x`` (followed by ``activation`` in the same pass); None for an unmapped layout or
    a failed kernel."""
    mapped = canonical(x, channel_dim)
    if mapped is None:
        return None
    out = OUTPUTS.empty_like(x)
    out3 = canonical(out, channel_dim)
    assert out3 is not None and out3[1] == mapped[1]  # same geometry as x
    kernel = _sparsify_kernel if activation is None else _sparsify_activate_kernel(activation)
    ok, _ = run_compiled(kernel, mapped[0], *band.flat, out3[0])
    return out if ok else None


def eager_forward(x: torch.Tensor, band: Band) -> torch.Tensor:
    return band_select(x, band.centre, band.threshold, band.centre_out)


def fused_exact_grad(
    x: torch.Tensor, band: Band, channel_dim: int, grad_output: torch.Tensor
) -> torch.Tensor | None:
    """The exact backward (zero inside the band) recomputed from the saved input in one fused pass; None where
    the gradient's layout or dtype does not map onto the input's or the kernel fails."""
    x3, channels_last = canonical(x, channel_dim)  # type: ignore[misc]  # mapped in the forward
    grad = grad_output.contiguous(
        memory_format=torch.channels_last if channels_last else torch.contiguous_format
    )
    grad3 = canonical(grad, channel_dim)
    if grad3 is None or grad3[1] != channels_last or grad.dtype != x.dtype:
        return None
    grad_input = OUTPUTS.empty_like(grad)
    ok, _ = run_compiled(
        _exact_grad_kernel,
        x3,
        band.flat[0],
        band.flat[1],
        grad3[0],
        canonical(grad_input, channel_dim)[0],  # type: ignore[index]
    )
    return grad_input if ok else None
