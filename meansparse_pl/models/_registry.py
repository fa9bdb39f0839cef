"""Model registry: architectures are created by name, timm style, so configs and checkpoints name a model
with a string and its keyword arguments instead of an import path."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import TypeVar

from torch import nn

from meansparse_pl.errors import ConfigurationError
from meansparse_pl.models.activations import get_activation
from meansparse_pl.models.layers import Normalize, NormalizedClassifier
from meansparse_pl.models.torchvision_models import build_torchvision_model

__all__ = ["TORCHVISION_PREFIX", "create_model", "list_models", "register_model"]

TORCHVISION_PREFIX = "torchvision:"

ModelFactory = Callable[..., nn.Module]
F = TypeVar("F", bound=ModelFactory)

_MODELS: dict[str, ModelFactory] = {}
# factories whose models normalise their own [0, 1] input (RobustBench models carry the mean / std they were
# trained with): create_model never wraps them in a second normalisation
_NORMALIZES_INPUT: set[str] = set()


def register_model(name: str, *, normalizes_input: bool = False) -> Callable[[F], F]:
    """Decorator registering a model factory under ``name``.

    The factory is called as ``factory(num_classes=..., in_channels=..., activation=..., **kwargs)`` and
    must return an ``nn.Module`` mapping normalised images to logits; :func:`create_model` adds the input
    normalisation around it. With ``normalizes_input=True`` the model already takes [0, 1] images and
    normalises them itself; a ``normalization`` given to :func:`create_model` (e.g. linked by the CLI from
    the datamodule) is then not applied a second time.
    """
    if not isinstance(name, str) or not name:
        raise ConfigurationError(f"model name must be a non-empty string, got {name!r}")
    if name.startswith(TORCHVISION_PREFIX):
        raise ConfigurationError(
            f"model names starting with {TORCHVISION_PREFIX!r} are reserved, got {name!r}"
        )

    def decorator(factory: F) -> F:
        if name in _MODELS:
            raise ConfigurationError(f"model {name!r} is already registered")
        _MODELS[name] = factory
        if normalizes_input:
            _NORMALIZES_INPUT.add(name)
        return factory

    return decorator


def list_models() -> list[str]:
    """Registered model names, sorted. ``torchvision:<name>`` is accepted too, for any torchvision
    classification model (``torchvision.models.list_models(module=torchvision.models)``)."""
    return sorted(_MODELS)


def create_model(
    name: str,
    *,
    num_classes: int = 10,
    in_channels: int = 3,
    activation: str = "relu",
    normalization: tuple[Sequence[float], Sequence[float]] | None = None,
    **kwargs: object,
) -> nn.Module:
    """Build model ``name`` taking images in [0, 1] and returning logits.

    Args:
        name: a name from :func:`list_models`, or ``torchvision:<name>`` for a torchvision classifier.
        num_classes: size of the output layer.
        in_channels: number of input image channels.
        activation: activation name (see :func:`~meansparse_pl.models.get_activation`); every use gets its
            own module instance.
        normalization: ``(mean, std)`` per channel. When given, the result is a
            :class:`~meansparse_pl.models.layers.NormalizedClassifier` whose first module normalises the
            input, so the model still takes [0, 1] images (what attacks perturb). When ``None``, or for a
            model registered with ``normalizes_input=True`` (``robustbench``), the bare backbone is returned.
        **kwargs: architecture-specific options (e.g. ``depth``/``widen_factor`` for WideResNets).
    """
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        raise ConfigurationError(f"num_classes must be a positive integer, got {num_classes!r}")
    if not isinstance(in_channels, int) or isinstance(in_channels, bool) or in_channels < 1:
        raise ConfigurationError(f"in_channels must be a positive integer, got {in_channels!r}")
    get_activation(activation)  # fail on an unknown activation before building anything

    if isinstance(name, str) and name.startswith(TORCHVISION_PREFIX):
        backbone = build_torchvision_model(
            name[len(TORCHVISION_PREFIX) :],
            num_classes=num_classes,
            in_channels=in_channels,
            activation=activation,
            **kwargs,
        )
    else:
        factory = _MODELS.get(name) if isinstance(name, str) else None
        if factory is None:
            raise ConfigurationError(
                f"unknown model {name!r}; valid names: {', '.join(list_models())}, or torchvision:<name>"
            )
        _check_kwargs(name, factory, kwargs)
        backbone = factory(num_classes=num_classes, in_channels=in_channels, activation=activation, **kwargs)

    if normalization is None or name in _NORMALIZES_INPUT:
        return backbone
    try:
        mean, std = normalization
    except (TypeError, ValueError):
        raise ConfigurationError(
            f"normalization must be a (mean, std) pair of sequences, got {normalization!r}"
        ) from None
    return NormalizedClassifier(Normalize(mean, std, num_channels=in_channels), backbone)


def _check_kwargs(name: str, factory: ModelFactory, kwargs: dict[str, object]) -> None:
    """Turn a misspelt architecture option into a ConfigurationError naming the accepted ones, instead of
    a TypeError from deep inside the constructor."""
    parameters = inspect.signature(factory).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return
    accepted = sorted(n for n in parameters if n not in ("num_classes", "in_channels", "activation"))
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise ConfigurationError(
            f"model {name!r} does not accept {', '.join(unknown)}; its options are: {', '.join(accepted) or 'none'}"
        )
