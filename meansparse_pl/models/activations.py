"""Activation modules by name, including the parametric PSiLU / PSSiLU of Dai et al. (2022).

Every call to :func:`get_activation` returns a NEW module instance. Architectures call it once per place an
activation is applied, never sharing one instance between two uses: MeanSparse operators are inserted in
front of each activation module and collect per-channel statistics of that one input, so a shared module
would mix the statistics of two different layers.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from meansparse_pl.errors import ConfigurationError
from meansparse_pl.placement import register_activation as register_placement_activation

__all__ = ["PSSiLU", "PSiLU", "get_activation", "list_activations", "register_backbone_activation"]


class PSiLU(nn.Module):
    """Parametric SiLU: ``x * sigmoid(beta * x)`` with one learnable scalar ``beta`` per module.

    Dai et al. (2022), "Parameterizing activation functions for adversarial robustness". ``beta`` starts at
    1.0, i.e. the module starts as the plain SiLU and training sharpens or flattens the gate. ``beta`` is
    left unconstrained (the formula is used as written); a negative ``beta`` is a valid, if unusual, gate.
    """

    def __init__(self, beta: float = 1.0) -> None:
        super().__init__()
        self.beta = nn.Parameter(torch.tensor(float(beta)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(self.beta * x)

    def extra_repr(self) -> str:
        return f"beta={self.beta.item():.4g}"


class PSSiLU(nn.Module):
    """Parametric shifted SiLU: ``x * (sigmoid(beta * x) - alpha) / (1 - alpha)`` (Dai et al., 2022).

    ``beta`` (init 1.0) is the gate sharpness as in :class:`PSiLU`. ``alpha`` shifts the gate
    ``sigmoid(beta * x)`` down, so inputs with ``sigmoid(beta * x) < alpha`` are mapped to the other side
    of zero, and the ``1 / (1 - alpha)`` factor keeps the slope for large positive ``x`` at 1. At
    ``alpha = 0`` the module is exactly :class:`PSiLU`.

    ``alpha`` must lie in ``[0, 1)``: at ``alpha = 1`` the division is by zero. The stored parameter is
    unconstrained and the forward uses ``clamp(alpha, 0, 1 - 1e-4)``; the clamp is a hard projection, so a
    value pushed outside the interval receives no gradient until an optimiser step moves it back.

    ``alpha`` is initialised to 0.01 (default ``alpha_init``) rather than exactly 0 for two reasons: the
    module then starts as (almost) the plain SiLU, which is known to train well adversarially, and the
    initial value lies strictly inside the clamp interval, so the gradient reaches ``alpha`` from the first
    step in both directions instead of sitting on the boundary of the projection.
    """

    ALPHA_MAX: float = 1.0 - 1e-4

    def __init__(self, beta: float = 1.0, alpha_init: float = 0.01) -> None:
        super().__init__()
        if not 0.0 <= alpha_init < 1.0:
            raise ConfigurationError(f"PSSiLU alpha_init must be in [0, 1), got {alpha_init}")
        self.beta = nn.Parameter(torch.tensor(float(beta)))
        self.alpha = nn.Parameter(torch.tensor(float(alpha_init)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        alpha = self.alpha.clamp(0.0, self.ALPHA_MAX)
        return x * (torch.sigmoid(self.beta * x) - alpha) / (1.0 - alpha)

    def extra_repr(self) -> str:
        return f"beta={self.beta.item():.4g}, alpha={self.alpha.item():.4g}"


_ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "elu": nn.ELU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "leaky_relu": lambda: nn.LeakyReLU(0.1),
    "softplus": nn.Softplus,
    "mish": nn.Mish,
    "hardswish": nn.Hardswish,
    "psilu": PSiLU,
    "pssilu": PSSiLU,
}


def register_backbone_activation(name: str, factory: Callable[[], nn.Module]) -> None:
    """Make ``factory`` available to the registry's backbones as activation ``name``
    (``backbone_kwargs={"activation": name}``); it is called once per use, so must build a new module each time (a
    class, or a function that constructs one). Placement's :func:`meansparse_pl.register_activation` is the other
    registry: which module types and functions get an operator."""
    if not name or not isinstance(name, str):
        raise ConfigurationError(f"activation name must be a non-empty string, got {name!r}")
    if name in _ACTIVATIONS:
        raise ConfigurationError(f"activation {name!r} is already registered")
    if not callable(factory):
        raise ConfigurationError(f"activation factory for {name!r} must be callable, got {factory!r}")
    _ACTIVATIONS[name] = factory


def list_activations() -> list[str]:
    """Names accepted by :func:`get_activation`, sorted."""
    return sorted(_ACTIVATIONS)


def get_activation(name: str) -> nn.Module:
    """A new activation module called ``name`` (never a shared instance; see the module docstring)."""
    try:
        factory = _ACTIVATIONS[name]
    except (KeyError, TypeError):
        raise ConfigurationError(
            f"unknown activation {name!r}; valid names: {', '.join(list_activations())}"
        ) from None
    module = factory()
    if not isinstance(module, nn.Module):
        raise ConfigurationError(
            f"activation factory for {name!r} returned {type(module).__name__}, not nn.Module"
        )
    return module


# Parametric activations are activations for MeanSparse placement too (an operator goes in front of them).
register_placement_activation(PSiLU)
register_placement_activation(PSSiLU)
