"""The band: the one formula of MeanSparse, shared by every path that computes or reasons about it.

For channel ``c`` the operator outputs the centre ``mu_c`` where ``|x - mu_c| < alpha * sigma_c`` (strict) and
``x`` elsewhere, with the threshold computed as ``alpha * sqrt(var)`` exactly as in the published RobustBench
modules. The eager forward, the autograd Functions, every fused CPU kernel and the adaptive attack's mask all
call :func:`inside_band`, so they can never disagree on a value that lies on the band's edge.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


def inside_band(x: torch.Tensor, centre: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """``|x - centre| < threshold``, strict, as the published modules compute it. The difference is a fresh
    tensor, so ``abs_`` is safe."""
    return (x - centre).abs_() < threshold


def band_select(
    x: torch.Tensor, centre: torch.Tensor, threshold: torch.Tensor, centre_out: torch.Tensor
) -> torch.Tensor:
    """The operator's output: ``centre_out`` inside the band, ``x`` elsewhere."""
    return torch.where(inside_band(x, centre, threshold), centre_out, x)


class Band(NamedTuple):
    """The band of one operator for one input dtype and rank (see ``MeanSparse.band``)."""

    centre: torch.Tensor  # comparison dtype, shaped to broadcast against the input
    threshold: torch.Tensor  # alpha * sqrt(var), comparison dtype, same shape
    centre_out: torch.Tensor  # the centre in the input dtype: what replaces values inside the band
    flat: tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # the three as fresh (1, C, 1) tensors
