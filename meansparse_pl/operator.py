"""The MeanSparse operator: mean-centred feature sparsification (Amini et al., 2024, eq. 7).

For channel ``c`` the operator outputs ``mu_c`` where ``|x - mu_c| < alpha * sigma_c`` and ``x`` elsewhere.
The comparison is strict and the threshold is computed as ``alpha * sqrt(var)`` exactly as in the published
RobustBench modules, so a published checkpoint reproduces its logits bit for bit.

Two backward modes exist because the operator masks gradients: ``exact`` (the true gradient, zero inside
the band) is what the model really computes; ``straight_through`` (identity backward, BPDA) is what an
adaptive attacker uses, and what every honest robustness number must also be measured with.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Literal

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


class _ExactSparsify(torch.autograd.Function):
    """where(|x - centre| < threshold, centre, x) with the true gradient: zero inside the band.

    A hand-written backward keeps only a boolean mask for backward instead of autograd's saved inputs of
    sub/abs/lt/where, which is both lighter on memory and faster in eager mode.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, centre: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
        inside_band = (x - centre).abs_() < threshold
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
        return torch.where((x - centre).abs_() < threshold, centre.to(x.dtype), x)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        return grad_output, None, None


_SPARSIFY_BY_MODE = {"exact": _ExactSparsify, "straight_through": _StraightThroughSparsify}


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

    # ----------------------------------------------------------------------------------------- state
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
    def _centre_and_threshold(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._observer is not None:
            self._observer(x)
            return x
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
            return x
        centre, threshold = self._centre_and_threshold(x)
        return _SPARSIFY_BY_MODE[self.backward_mode].apply(x, centre, threshold)

    def extra_repr(self) -> str:
        return (
            f"channels={self.num_channels}, channel_dim={self.channel_dim}, alpha={float(self.alpha):g}, "
            f"centre={self.centre}, backward={self.backward_mode}, calibrated={self.is_calibrated}"
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
