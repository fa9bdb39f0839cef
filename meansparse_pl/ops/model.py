"""Whole-model helpers: find the operators of a model, set their alpha, switch their backward mode."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn

from meansparse_pl.config import check_alpha
from meansparse_pl.errors import ConfigurationError, PlacementError
from meansparse_pl.ops.functions import BackwardMode, check_backward_mode
from meansparse_pl.ops.meansparse import MeanSparse


def operators(model: nn.Module) -> list[MeanSparse]:
    """Every MeanSparse operator in ``model``, in registration order."""
    return [m for m in model.modules() if isinstance(m, MeanSparse)]


def require_operators(model: nn.Module) -> list[MeanSparse]:
    found = operators(model)
    if not found:
        raise PlacementError(
            "the model has no MeanSparse operators; run meansparse_pl.sparsify(model, example_input) first."
        )
    return found


def set_alpha(model: nn.Module, alpha: float) -> None:
    """Set the one shared alpha of every operator in ``model``."""
    alpha = check_alpha(alpha)
    for op in require_operators(model):
        op.set_alpha(alpha)


def get_alpha(model: nn.Module) -> float:
    values = {float(op.alpha) for op in require_operators(model)}
    if len(values) != 1:
        raise ConfigurationError(
            f"operators carry different alpha values {sorted(values)}; set one with set_alpha."
        )
    return values.pop()


def set_backward_mode(model: nn.Module, mode: BackwardMode) -> None:
    check_backward_mode(mode)
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
