"""The operator's autograd Functions: one per backward mode, eager and fused.

Several backward modes exist because the operator masks gradients: ``exact`` (the true gradient, zero inside the
band) is what the model really computes; ``straight_through`` (identity backward, BPDA) and ``surrogate`` (the
band's indicator replaced by a sigmoid of ``(|x - mu| - alpha*sigma) / (tau*sigma)``) are what an adaptive
attacker uses, and what every honest robustness number must also be measured with. The forward is the same
in every mode.
"""

from __future__ import annotations

from typing import Literal

import torch

from meansparse_pl.config import check_choice
from meansparse_pl.ops import kernels
from meansparse_pl.ops.band import Band, band_select, inside_band

BackwardMode = Literal["exact", "straight_through", "surrogate"]
BACKWARD_MODES: tuple[str, ...] = ("exact", "straight_through", "surrogate")
DEFAULT_TEMPERATURE = 0.1  # the surrogate's width in channel standard deviations


def check_backward_mode(mode: str) -> str:
    return check_choice("backward mode", mode, BACKWARD_MODES)


class ExactSparsify(torch.autograd.Function):
    """where(|x - centre| < threshold, centre, x) with the true gradient: zero inside the band.

    A hand-written backward keeps only a boolean mask for backward instead of autograd's saved inputs of
    sub/abs/lt/where, which is both lighter on memory and faster in eager mode.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, centre: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
        inside = inside_band(x, centre, threshold)
        ctx.save_for_backward(inside)
        return torch.where(inside, centre.to(x.dtype), x)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (inside,) = ctx.saved_tensors
        return grad_output.masked_fill(inside, 0), None, None


class StraightThroughSparsify(torch.autograd.Function):
    """Same forward; identity backward (BPDA, Athalye et al. 2018) so attacks see through the band."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, centre: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
        return band_select(x, centre, threshold, centre.to(x.dtype))

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        return grad_output, None, None


class SurrogateSparsify(torch.autograd.Function):
    """Same forward; the backward of the smooth relaxation (see the module docstring), computed in the comparison
    dtype from the saved input; ``width`` is ``tau * sigma`` per channel, shaped like ``threshold``."""

    @staticmethod
    def forward(
        ctx, x: torch.Tensor, centre: torch.Tensor, threshold: torch.Tensor, width: torch.Tensor
    ) -> torch.Tensor:
        ctx.save_for_backward(x, centre, threshold, width)
        return band_select(x, centre, threshold, centre.to(x.dtype))

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        x, centre, threshold, width = ctx.saved_tensors
        distance = (x.to(centre.dtype) - centre).abs()
        outside = torch.sigmoid((distance - threshold) / width)
        slope = outside + distance * outside * (1.0 - outside) / width
        return (grad_output * slope).to(grad_output.dtype), None, None, None


SPARSIFY_BY_MODE = {"exact": ExactSparsify, "straight_through": StraightThroughSparsify}


class FusedExactSparsify(torch.autograd.Function):
    """Fused forward; the backward recomputes the band test from the saved input in one fused pass, so no
    mask is stored (the input is kept alive instead: it is usually freed right after the operator)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, band: Band, channel_dim: int) -> torch.Tensor:
        ctx.band, ctx.channel_dim = band, channel_dim
        out = kernels.fused_forward(x, band, channel_dim)
        if out is None:  # the kernel failed: the eager formula with a saved mask
            inside = inside_band(x, band.centre, band.threshold)
            ctx.save_for_backward(inside)
            ctx.fused = False
            return torch.where(inside, band.centre_out, x)
        ctx.save_for_backward(x)
        ctx.fused = True
        return out

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        band = ctx.band
        if not ctx.fused:
            (inside,) = ctx.saved_tensors
            return grad_output.masked_fill(inside, 0), None, None
        (x,) = ctx.saved_tensors
        grad_input = kernels.fused_exact_grad(x, band, ctx.channel_dim, grad_output)
        if grad_input is not None:
            return grad_input, None, None
        return grad_output.masked_fill(inside_band(x, band.centre, band.threshold), 0), None, None


class FusedStraightThroughSparsify(torch.autograd.Function):
    """Fused forward; identity backward, nothing saved."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, band: Band, channel_dim: int) -> torch.Tensor:
        out = kernels.fused_forward(x, band, channel_dim)
        return kernels.eager_forward(x, band) if out is None else out

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        return grad_output, None, None


FUSED_BY_MODE = {"exact": FusedExactSparsify, "straight_through": FusedStraightThroughSparsify}
