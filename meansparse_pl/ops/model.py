"""Whole-model helpers: find the operators of a model, set their alpha, switch their backward mode."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

from torch import nn

from meansparse_pl.config import check_alpha, check_number
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


def set_alpha(model: nn.Module, alpha: float | Sequence[float]) -> None:
    """Set the alpha of every operator in ``model``: one value for all, or one per operator (in the order of
    :func:`operators`)."""
    ops = require_operators(model)
    if isinstance(alpha, Sequence) and not isinstance(alpha, str):
        if len(alpha) != len(ops):
            raise ConfigurationError(
                f"{len(alpha)} alpha values for {len(ops)} operators; give one value, or one per operator."
            )
        values = [check_alpha(a) for a in alpha]
    else:
        values = [check_alpha(alpha)] * len(ops)
    for op, value in zip(ops, values, strict=True):
        op.set_alpha(value)


def alphas_of(model: nn.Module) -> list[float]:
    """Every operator's alpha, in the order of :func:`operators`."""
    return [op.alpha_value for op in require_operators(model)]


def get_alpha(model: nn.Module) -> float:
    """The one alpha all operators share (an error where they differ: see :func:`alphas_of`)."""
    values = set(alphas_of(model))
    if len(values) != 1:
        raise ConfigurationError(
            f"operators carry different alpha values {sorted(values)}; use alphas_of for them, or set one with "
            "set_alpha."
        )
    return values.pop()


def set_backward_mode(model: nn.Module, mode: BackwardMode, temperature: float | None = None) -> None:
    """Every operator's backward: ``exact``, ``straight_through`` or ``surrogate`` (with ``temperature``, the
    relaxation's width in channel standard deviations; None keeps each operator's)."""
    check_backward_mode(mode)
    if temperature is not None:
        temperature = check_number("temperature", temperature, minimum=0.0, strict=True)
    for op in operators(model):
        op.backward_mode = mode
        if temperature is not None:
            op.temperature = temperature


@contextlib.contextmanager
def temporary_alpha(model: nn.Module, alpha: float | None = None) -> Iterator[nn.Module]:
    """Every operator's alpha back as it was on exit; with ``alpha``, every operator at that value inside, e.g.
    ``with temporary_alpha(m, 0.0):`` for the base model. A model without operators passes through."""
    previous = [(op, op.alpha_value) for op in operators(model)]
    try:
        if alpha is not None:
            for op, _ in previous:
                op.set_alpha(alpha)
        yield model
    finally:
        for op, value in previous:
            op.set_alpha(value)


@contextlib.contextmanager
def backward_mode(
    model: nn.Module, mode: BackwardMode, temperature: float | None = None
) -> Iterator[nn.Module]:
    """Temporarily switch every operator's backward, e.g. ``with backward_mode(m, "straight_through"):`` or
    ``with backward_mode(m, "surrogate", temperature=0.1):``."""
    previous = [(op, op.backward_mode, op.temperature) for op in operators(model)]
    set_backward_mode(model, mode, temperature)
    try:
        yield model
    finally:
        for op, old, width in previous:
            op.backward_mode = old
            op.temperature = width
