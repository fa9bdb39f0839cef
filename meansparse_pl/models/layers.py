"""Layers shared by the architectures: input normalisation inside the model.

Attacks (AutoAttack, PGD) perturb inputs in [0, 1] pixel space with an epsilon defined in that space, so a
model under attack must take [0, 1] images and normalise them itself. Keeping the mean/std as buffers of a
first :class:`Normalize` module also stores them in every checkpoint, so they can never be forgotten or
applied twice by a data pipeline.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import nn

from meansparse_pl.errors import ConfigurationError

__all__ = ["Normalize", "NormalizedClassifier"]


class Normalize(nn.Module):
    """``(x - mean) / std`` per channel, with ``mean``/``std`` stored as (1, C, 1, 1) buffers.

    A single value for mean or std is broadcast to all ``num_channels`` channels (handy for grey images or
    a dataset-wide constant).
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float], num_channels: int | None = None) -> None:
        super().__init__()
        # checked as Python numbers, so the module can also be built on the meta device (no values there)
        means, stds = _channel_values(mean, "mean", num_channels), _channel_values(std, "std", num_channels)
        if len(means) != len(stds):
            if len(means) == 1:
                means = means * len(stds)
            elif len(stds) == 1:
                stds = stds * len(means)
            else:
                raise ConfigurationError(
                    f"normalization mean has {len(means)} values but std has {len(stds)}"
                )
        if any(v <= 0 for v in stds):
            raise ConfigurationError(f"normalization std must be > 0 in every channel, got {stds}")
        self.register_buffer("mean", torch.tensor(means, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(stds, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def extra_repr(self) -> str:
        return f"mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()}"


def _channel_values(values: Sequence[float] | float, what: str, num_channels: int | None) -> list[float]:
    """One finite float per channel (a single value is repeated for every channel when their number is known)."""
    if isinstance(values, int | float):
        values = [values]
    try:
        floats = [float(v) for v in values]
    except (TypeError, ValueError):
        raise ConfigurationError(
            f"normalization {what} must be a sequence of numbers, got {values!r}"
        ) from None
    if not floats:
        raise ConfigurationError(f"normalization {what} is empty")
    if not all(math.isfinite(v) for v in floats):
        raise ConfigurationError(f"normalization {what} must be finite, got {floats}")
    if num_channels is not None and len(floats) not in (1, num_channels):
        raise ConfigurationError(
            f"normalization {what} has {len(floats)} values but the model takes {num_channels} input channels"
        )
    return floats * num_channels if num_channels is not None and len(floats) == 1 else floats


class NormalizedClassifier(nn.Sequential):
    """``backbone(normalize(x))``: a classifier that takes [0, 1] images.

    A ``Sequential`` so that ``model[0]`` is the :class:`Normalize` module (the first module, as the
    AutoAttack/RobustBench contract expects), ``model.normalize`` and ``model.backbone`` name the two parts,
    and the model stays trivially traceable by ``torch.fx``.
    """

    def __init__(self, normalize: Normalize, backbone: nn.Module) -> None:
        super().__init__(OrderedDict([("normalize", normalize), ("backbone", backbone)]))
