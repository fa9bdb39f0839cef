"""The MeanSparse operator: mean-centred feature sparsification (Amini et al., 2024, eq. 7).

For channel ``c`` the operator outputs ``mu_c`` where ``|x - mu_c| < alpha * sigma_c`` and ``x`` elsewhere
(:mod:`meansparse_pl.ops.band`). The comparison is strict and the threshold is computed as
``alpha * sqrt(var)`` exactly as in the published RobustBench modules, so a published checkpoint reproduces
its logits bit for bit. The backward modes are in :mod:`meansparse_pl.ops.functions`, the fused CPU kernels in
:mod:`meansparse_pl.ops.kernels`. The band tensors ``centre`` and ``alpha * sqrt(var)`` are cached per input
dtype, device and rank, and rebuilt whenever a buffer changes.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from meansparse_pl.config import CENTRES, Centre, check_alpha, check_choice, check_number
from meansparse_pl.errors import ConfigurationError, StatisticsError, UncalibratedOperatorError
from meansparse_pl.ops import kernels
from meansparse_pl.ops.band import Band, inside_band
from meansparse_pl.ops.functions import (
    DEFAULT_TEMPERATURE,
    FUSED_BY_MODE,
    SPARSIFY_BY_MODE,
    BackwardMode,
    SurrogateSparsify,
    check_backward_mode,
)
from meansparse_pl.ops.kernels import FusedActivation


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


def _as_float32(value: float) -> float:
    """``value`` as the float32 alpha buffer holds it, computed on the host (reading the buffer back would be a
    device sync)."""
    return struct.unpack("f", struct.pack("f", value))[0]


#: the buffers that define the band; they stay float32 under every module cast
BAND_BUFFERS = ("mean", "var", "alpha")


def _readable(value: object, shape: tuple[int, ...]) -> bool:
    """A state-dict entry whose values can be checked: a tensor of the expected shape with real storage (a wrong
    shape is load_state_dict's own size-mismatch error)."""
    return isinstance(value, torch.Tensor) and tuple(value.shape) == shape and not value.is_meta


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
        backward_mode: ``exact``, ``straight_through`` or ``surrogate`` (:mod:`meansparse_pl.ops.functions`).
        temperature: the surrogate backward's width in channel standard deviations.
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
        temperature: float = DEFAULT_TEMPERATURE,
    ) -> None:
        super().__init__()
        if num_channels < 1:
            raise ConfigurationError(f"num_channels must be >= 1, got {num_channels}.")
        check_choice("centre", centre, CENTRES)
        check_backward_mode(backward_mode)
        self.num_channels = int(num_channels)
        self.channel_dim = int(channel_dim)
        self.centre = centre
        self.backward_mode: BackwardMode = backward_mode
        self.temperature = check_number("temperature", temperature, minimum=0.0, strict=True)
        self.activation = activation
        self.site_name = ""  # set by placement, used in error messages
        # float32 whatever the default dtype (Lightning's bf16-true / 16-true create modules under a half
        # default) and whatever the module is later cast to (see _apply); int64 for the count, so model.half()
        # never turns a count of millions of elements into float16 inf
        self.register_buffer("mean", torch.zeros(num_channels, dtype=torch.float32))
        self.register_buffer("var", torch.ones(num_channels, dtype=torch.float32))
        self.register_buffer("count", torch.zeros((), dtype=torch.int64))
        self.register_buffer("alpha", torch.tensor(check_alpha(alpha), dtype=torch.float32))
        # Host-side copies of alpha and "calibrated", so forward never reads a device tensor (a GPU sync and
        # a torch.compile graph break per operator per call). Kept in step by set_alpha, set_statistics and
        # state-dict loading; write the buffers only through those.
        self._alpha_value = _as_float32(check_alpha(alpha))
        self._calibrated = False
        # While calibration runs, the observer sees every input and the operator passes it through untouched
        # (set and cleared by meansparse_pl.calibration.Calibrator).
        self.observer: Callable[[torch.Tensor], None] | None = None
        # (input dtype, device, rank) -> (buffer token, band tensors); see _band
        self._band_cache: dict[tuple, tuple[tuple, Band]] = {}

    # ----------------------------------------------------------------------------------------- state
    def __getstate__(self) -> dict:
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__
        return {**state, "_band_cache": {}}  # copies and pickles rebuild the band on first use

    def _apply(self, fn: Callable, *args: Any, **kwargs: Any) -> MeanSparse:
        """Move the buffers with the module but never change their dtype: ``model.half()``,
        ``model.to(torch.bfloat16)`` and Lightning's ``bf16-true`` / ``16-true`` cast the network, while the
        band (mean, variance, alpha) keeps its float32 values, so the band test is the float32 one and alpha
        stays exactly what was set (bf16 would read 0.4004 for 0.4)."""
        kept = {name: self._buffers.pop(name) for name in BAND_BUFFERS if self._buffers.get(name) is not None}
        try:
            super()._apply(fn, *args, **kwargs)
        finally:
            for name, buffer in kept.items():
                moved = fn(buffer)
                # a cast: only the device (and memory) of fn's result is taken
                if moved.dtype != buffer.dtype:
                    moved = buffer.to(device=moved.device)
                self._buffers[name] = moved
        self._band_cache = {}
        return self

    @property
    def is_calibrated(self) -> bool:
        return self._calibrated

    @property
    def alpha_value(self) -> float:
        """The operator's alpha (the float32 buffer's value), read without touching the device."""
        return self._alpha_value

    def set_alpha(self, alpha: float) -> None:
        value = check_alpha(alpha)
        self.alpha.fill_(value)
        self._alpha_value = _as_float32(value)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # A state dict may come from a file: its statistics and alpha are checked before they are copied in, so
        # NaN, Inf, a negative variance or alpha can never load silently (every loading path comes here).
        mean, var = state_dict.get(prefix + "mean"), state_dict.get(prefix + "var")
        alpha, count = state_dict.get(prefix + "alpha"), state_dict.get(prefix + "count")
        where = self.site_name or prefix.rstrip(".") or "a MeanSparse operator"
        if _readable(mean, (self.num_channels,)) and _readable(var, (self.num_channels,)):
            self._check_statistics(mean, var, where, "in the checkpoint")
        if _readable(alpha, ()) and not (bool(torch.isfinite(alpha)) and float(alpha) >= 0.0):
            raise StatisticsError(
                f"{where}: alpha {float(alpha)} in the checkpoint is not a finite number >= 0; the file is corrupt "
                "(set alpha again with set_alpha and save it)."
            )
        if _readable(count, ()) and int(count) < 0:
            raise StatisticsError(
                f"{where}: negative element count {int(count)} in the checkpoint; the file is corrupt."
            )
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if not self.alpha.is_meta:
            self._alpha_value = float(self.alpha)
            self._calibrated = bool(self.count > 0)

    def _check_statistics(self, mean: torch.Tensor, var: torch.Tensor, where: str, source: str) -> None:
        source = f" {source}" if source else ""
        for name, value in (("mean", mean), ("var", var)):
            if value.shape != (self.num_channels,):
                raise StatisticsError(
                    f"{where}: {name} has shape {tuple(value.shape)} but the site has {self.num_channels} "
                    "channels; the statistics belong to a different model or placement."
                )
            if not torch.isfinite(value).all():
                raise StatisticsError(
                    f"{where}: channel {name}{source} contains NaN or Inf (diverged model, bad input data or a "
                    "corrupt file); calibrate again on clean data."
                )
        if (var < 0).any():
            raise StatisticsError(
                f"{where}: negative variance{source}; the statistics are corrupt, calibrate again."
            )

    def set_statistics(self, mean: torch.Tensor, var: torch.Tensor, count: float) -> None:
        """Install channel statistics (from calibration or a checkpoint), validating them first."""
        self._check_statistics(mean, var, self.site_name or "a MeanSparse operator", "")
        self.mean.copy_(mean.to(self.mean))
        self.var.copy_(var.to(self.var))
        elements = int(round(float(count)))
        self.count.fill_(elements)
        self._calibrated = elements > 0

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

    def band(self, x: torch.Tensor) -> Band:
        """The band tensors for ``x``'s dtype, device and rank, cached between calls (see ``Band``)."""
        if kernels.tracing():
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

    def _build_band(self, x: torch.Tensor) -> Band:
        centre, threshold = self._compute_centre_and_threshold(x)
        centre_out = centre.to(x.dtype)
        if kernels.tracing():
            return Band(centre, threshold, centre_out, (centre, threshold, centre_out))
        flat = tuple(t.reshape(1, self.num_channels, 1).clone() for t in (centre, threshold, centre_out))
        return Band(centre, threshold, centre_out, flat)  # type: ignore[arg-type]

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

    def overwritten(self, x: torch.Tensor) -> torch.Tensor:
        """Where the operator replaces ``x`` by the centre: the forward's own band test (strict, same dtype rule);
        empty when alpha is 0 (the operator is then the identity)."""
        if self._alpha_value == 0.0:
            return torch.zeros_like(x, dtype=torch.bool)
        band = self.band(x)
        return inside_band(x, band.centre, band.threshold)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        module = self.__dict__.get("_fused_module")
        if module is not None and (
            module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
        ):
            # a hook was registered on the activation module this operator took over: call the module, so the
            # hook fires as in the model without the operator (the fused pass resumes once it is removed)
            return module(self._forward(x, None))
        return self._forward(x, self.activation)

    def attach_fused_module(self, module: nn.Module) -> None:
        """Remember the activation module whose work :attr:`activation` does (kept outside the submodules, so
        the state dict and ``named_modules`` are unchanged), so hooks registered on it still fire."""
        self.__dict__["_fused_module"] = module

    def without_activation(self, x: torch.Tensor) -> torch.Tensor:
        """The operator's own output, without the activation placement may have fused into it (for plots
        and analyses of the band itself)."""
        return self._forward(x, None)

    def _forward(self, x: torch.Tensor, activation: FusedActivation | None) -> torch.Tensor:
        activate = _identity if activation is None else activation.fn
        if self.observer is not None:  # collecting statistics: the input passes through, then the activation
            self.observer(x)
            return x if activation is None else activation.apply(x)
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
        band = self.band(x)
        if kernels.tracing() or kernels.transformed():
            # torch.compile / jit see the plain formula inside an autograd.Function; torch.func transforms the
            # eager Functions (their vmap rule is generated)
            return activate(self._with_gradient(x, band))
        fused = kernels.fused_applicable(x) and kernels.canonical(x, self.channel_dim) is not None
        if not (x.requires_grad and torch.is_grad_enabled()):  # inference: no autograd Function needed
            out = kernels.fused_forward(x, band, self.channel_dim, activation) if fused else None
            return activate(kernels.eager_forward(x, band)) if out is None else out
        # With gradients the activation stays a separate autograd op: its backward is then autograd's own in
        # both backward modes (the attack path already costs little next to the backward pass).
        if fused and self.backward_mode in FUSED_BY_MODE:
            return activate(FUSED_BY_MODE[self.backward_mode].apply(x, band, self.channel_dim))
        return activate(self._with_gradient(x, band))

    def _with_gradient(self, x: torch.Tensor, band: Band) -> torch.Tensor:
        """The eager autograd Function of the backward mode."""
        if self.backward_mode == "surrogate":
            # tau * sigma = tau * threshold / alpha (alpha > 0 here); a channel of zero variance has an empty band,
            # where the relaxation is the identity: a tiny width keeps it finite
            width = (band.threshold * (self.temperature / self._alpha_value)).clamp_min(1e-12)
            return SurrogateSparsify.apply(x, band.centre, band.threshold, width)
        return SPARSIFY_BY_MODE[self.backward_mode](x, band.centre, band.threshold)

    def extra_repr(self) -> str:
        return (
            f"channels={self.num_channels}, channel_dim={self.channel_dim}, alpha={self._alpha_value:g}, "
            f"centre={self.centre}, backward={self.backward_mode}"
            + (f"(temperature={self.temperature:g})" if self.backward_mode == "surrogate" else "")
            + f", calibrated={self.is_calibrated}"
            + (f", then {self.activation.name}" if self.activation is not None else "")
        )
