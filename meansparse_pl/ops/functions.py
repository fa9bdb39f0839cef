"""The operator's autograd Functions: one per backward mode, eager and fused.

Several backward modes exist because the operator masks gradients: ``exact`` (the true gradient, zero inside the
band) is what the model really computes; ``straight_through`` (identity backward, BPDA) and ``surrogate`` (the
band's indicator replaced by a sigmoid of ``(|x - mu| - alpha*sigma) / (tau*sigma)``) are what an adaptive
attacker uses, and what every honest robustness number must also be measured with. The forward is the same
in every mode.

Every Function is written in the ``setup_context`` style, so ``torch.func`` (``grad``, ``vmap``, ``jacrev``)
can transform the eager ones (``generate_vmap_rule``); under such a transform the operator always takes the eager
Functions (the fused kernels are plain ``torch.compile`` calls that a transform cannot see into). Every backward
is itself differentiable when autograd records it (``create_graph=True``): the fused kernels then give way to
the eager formula, so second-order methods (gradient penalties, Hessian-vector products) are exact on every
path. Gradients come back in the input's memory format (channels_last stays channels_last).
"""

from __future__ import annotations

from typing import Any, Literal

import torch

from meansparse_pl.config import check_choice
from meansparse_pl.ops import kernels
from meansparse_pl.ops.band import Band, band_select, inside_band

BackwardMode = Literal["exact", "straight_through", "surrogate"]
BACKWARD_MODES: tuple[str, ...] = ("exact", "straight_through", "surrogate")
DEFAULT_TEMPERATURE = 0.1  # the surrogate's width in channel standard deviations


def check_backward_mode(mode: str) -> str:
    return check_choice("backward mode", mode, BACKWARD_MODES)


def _channels_last(x: torch.Tensor) -> bool:
    """Whether ``x`` is a 4-D channels_last tensor (never asked of functorch's wrapped tensors)."""
    return (
        x.dim() == 4
        and not kernels.transformed()
        and not x.is_contiguous()
        and x.is_contiguous(memory_format=torch.channels_last)
    )


def _in_layout(grad: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """``grad`` in the input's memory format: a copy only where the layouts differ (the next backward would
    otherwise convert it itself)."""
    if channels_last and not grad.is_contiguous(memory_format=torch.channels_last):
        return grad.contiguous(memory_format=torch.channels_last)
    return grad


def zero_inside(grad: torch.Tensor, inside: torch.Tensor) -> torch.Tensor:
    """``grad`` with the band's entries zeroed, in the layout of ``inside`` (the input's). Recorded by autograd
    when the backward itself is differentiated; otherwise written straight into input-layout memory."""
    if torch.is_grad_enabled() or kernels.transformed():
        return torch.where(inside, torch.zeros((), dtype=grad.dtype, device=grad.device), grad)
    out = torch.empty_like(inside, dtype=grad.dtype)
    return torch.where(inside, torch.zeros((), dtype=grad.dtype, device=grad.device), grad, out=out)


class ExactSparsify(torch.autograd.Function):
    """where(|x - centre| < threshold, centre, x) with the true gradient: zero inside the band.

    The forward also returns the band mask (non-differentiable; :func:`exact_sparsify` drops it), which is all the
    backward keeps: lighter on memory and faster than autograd's saved inputs of sub/abs/lt/where.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x: torch.Tensor, centre: torch.Tensor, threshold: torch.Tensor) -> Any:
        inside = inside_band(x, centre, threshold)
        return torch.where(inside, centre.to(x.dtype), x), inside

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
        ctx.mark_non_differentiable(output[1])
        ctx.save_for_backward(output[1])

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor, _grad_inside: Any) -> tuple:
        (inside,) = ctx.saved_tensors
        return zero_inside(grad_output, inside), None, None


def exact_sparsify(x: torch.Tensor, centre: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    return ExactSparsify.apply(x, centre, threshold)[0]


class StraightThroughSparsify(torch.autograd.Function):
    """Same forward; identity backward (BPDA, Athalye et al. 2018) so attacks see through the band."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: torch.Tensor, centre: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
        return band_select(x, centre, threshold, centre.to(x.dtype))

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
        ctx.channels_last = _channels_last(inputs[0])

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple:
        return _in_layout(grad_output, ctx.channels_last), None, None


def straight_through_sparsify(x: torch.Tensor, centre: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    return StraightThroughSparsify.apply(x, centre, threshold)


class SurrogateSparsify(torch.autograd.Function):
    """Same forward; the backward of the smooth relaxation (see the module docstring), computed in the comparison
    dtype from the saved input; ``width`` is ``tau * sigma`` per channel, shaped like ``threshold``."""

    generate_vmap_rule = True

    @staticmethod
    def forward(
        x: torch.Tensor, centre: torch.Tensor, threshold: torch.Tensor, width: torch.Tensor
    ) -> torch.Tensor:
        return band_select(x, centre, threshold, centre.to(x.dtype))

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
        ctx.save_for_backward(*inputs)
        ctx.channels_last = _channels_last(inputs[0])

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple:
        x, centre, threshold, width = ctx.saved_tensors
        distance = (x.to(centre.dtype) - centre).abs()
        outside = torch.sigmoid((distance - threshold) / width)
        slope = outside + distance * outside * (1.0 - outside) / width
        grad = (grad_output * slope).to(grad_output.dtype)
        return _in_layout(grad, ctx.channels_last), None, None, None


SPARSIFY_BY_MODE = {"exact": exact_sparsify, "straight_through": straight_through_sparsify}


class FusedExactSparsify(torch.autograd.Function):
    """Fused forward; the backward recomputes the band test from the saved input in one fused pass, so no
    mask is stored (the input is kept alive instead: it is usually freed right after the operator). Where the
    backward is itself recorded (``create_graph=True``) or the kernel fails, the eager formula runs instead."""

    @staticmethod
    def forward(x: torch.Tensor, band: Band, channel_dim: int) -> torch.Tensor:
        out = kernels.fused_forward(x, band, channel_dim)
        return kernels.eager_forward(x, band) if out is None else out

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
        x, ctx.band, ctx.channel_dim = inputs
        ctx.save_for_backward(x)

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple:
        (x,) = ctx.saved_tensors
        band = ctx.band
        if not torch.is_grad_enabled():  # a plain backward: the one fused pass
            grad_input = kernels.fused_exact_grad(x, band, ctx.channel_dim, grad_output)
            if grad_input is not None:
                return grad_input, None, None
        return zero_inside(grad_output, inside_band(x, band.centre, band.threshold)), None, None


class FusedStraightThroughSparsify(torch.autograd.Function):
    """Fused forward; identity backward, nothing saved."""

    @staticmethod
    def forward(x: torch.Tensor, band: Band, channel_dim: int) -> torch.Tensor:
        out = kernels.fused_forward(x, band, channel_dim)
        return kernels.eager_forward(x, band) if out is None else out

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
        ctx.channels_last = _channels_last(inputs[0])

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple:
        return _in_layout(grad_output, ctx.channels_last), None, None


FUSED_BY_MODE = {"exact": FusedExactSparsify, "straight_through": FusedStraightThroughSparsify}
