"""What placement looks for: the activation registry and the named site rules (presets).

A registry is data: :func:`register_activation` adds a module type or a function, :func:`register_preset` a
site rule; architectures (``meansparse_pl.models``) register their own activations here, and nothing in
placement imports them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from meansparse_pl.errors import ConfigurationError

ACTIVATION_MODULES: list[type[nn.Module]] = [
    nn.ReLU,
    nn.ReLU6,
    nn.GELU,
    nn.SiLU,
    nn.ELU,
    nn.CELU,
    nn.SELU,
    nn.LeakyReLU,
    nn.RReLU,
    nn.Mish,
    nn.Hardswish,
    nn.Softplus,
    nn.PReLU,
]
ACTIVATION_FUNCTIONS: dict[Callable, str] = {
    F.relu: "F.relu",
    F.relu_: "F.relu_",
    torch.relu: "torch.relu",
    torch.relu_: "torch.relu_",
    F.relu6: "F.relu6",
    F.gelu: "F.gelu",
    F.silu: "F.silu",
    F.elu: "F.elu",
    F.celu: "F.celu",
    F.selu: "F.selu",
    torch.selu: "torch.selu",
    F.leaky_relu: "F.leaky_relu",
    F.mish: "F.mish",
    F.hardswish: "F.hardswish",
    F.softplus: "F.softplus",
    F.prelu: "F.prelu",
    torch.prelu: "torch.prelu",
}
ACTIVATION_METHODS: dict[str, str] = {"relu": "Tensor.relu", "relu_": "Tensor.relu_"}


def register_activation(activation: type[nn.Module] | Callable, name: str | None = None) -> None:
    """Make placement treat a module type (e.g. a parametric activation) or a function as an activation."""
    if isinstance(activation, type) and issubclass(activation, nn.Module):
        if activation not in ACTIVATION_MODULES:
            ACTIVATION_MODULES.append(activation)
    elif callable(activation):
        ACTIVATION_FUNCTIONS[activation] = name or getattr(activation, "__qualname__", repr(activation))
    else:
        raise ConfigurationError(
            f"register_activation takes an nn.Module subclass or a function, got {activation!r}."
        )


def is_activation_module(module: nn.Module) -> bool:
    return isinstance(module, tuple(ACTIVATION_MODULES))


# ---------------------------------------------------------------------------------------------- presets
@dataclass(frozen=True)
class PlacementPreset:
    """A named site rule: which kinds of fx sites get an operator.

    Attributes:
        name: the name recorded in :class:`Placement` (checkpoints rebuild the same sites from it).
        description: one line for documentation and error messages.
        activations: an operator before every activation call (the paper's rule).
        residual_adds: an operator after every residual sum: an ``add`` of two tensors of the same shape
            that both depend on the model input (so ``x + pos_embed`` or ``attn + relative_bias`` are not
            residual sums, ``x + f(x)`` and ``shortcut(x) + f(x)`` are).
        after_modules: fnmatch patterns of module paths: an operator after every call of a matching
            module. Matching modules are traced as leaves, so a module fx would trace through (timm's
            ``DropPath``) is still one call site.
        exclude: fnmatch patterns of site module paths never sparsified (squeeze-and-excitation blocks).
        channel_dims: fnmatch pattern -> channel axis for sites whose layout the automatic detection
            cannot see (window-attention outputs reach the residual sum through reshapes); the caller's
            ``channel_dims`` still take precedence.
    """

    name: str
    description: str
    activations: bool = True
    residual_adds: bool = False
    after_modules: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    channel_dims: tuple[tuple[str, int], ...] = ()


PRESETS: dict[str, PlacementPreset] = {}


def register_preset(preset: PlacementPreset) -> None:
    """Make a site rule available by name to :func:`sparsify` (and to checkpoints that record it)."""
    if not isinstance(preset, PlacementPreset):
        raise ConfigurationError(f"register_preset takes a PlacementPreset, got {preset!r}.")
    if not (preset.activations or preset.residual_adds or preset.after_modules):
        raise ConfigurationError(f"preset {preset.name!r} selects no site kind.")
    PRESETS[preset.name] = preset


for _preset in (
    PlacementPreset("activations", "before every activation call (the paper's rule)"),
    PlacementPreset(
        "published_wrn",
        "released S-WRN / Ra-WRN models: before every activation and after every residual sum; nothing "
        "inside squeeze-and-excitation modules",
        residual_adds=True,
        exclude=("*.se.*", "*.se"),
    ),
    PlacementPreset(
        "published_convnext",
        "released ConvNeXt-L: before the MLP activation (channels-last) and after drop_path on the "
        "residual branch, before the add (channels-first)",
        after_modules=("*.drop_path",),
        channel_dims=(("*.drop_path", 1), ("*.mlp.act", -1)),
    ),
    PlacementPreset(
        "published_swin",
        "released Swin-L: after both residual sums of every block, before the MLP activation and after the "
        "MLP's fc2; every feature is channels-last",
        residual_adds=True,
        after_modules=("*.mlp.fc2",),
        channel_dims=(("*", -1),),
    ),
):
    register_preset(_preset)


def get_preset(name: str) -> PlacementPreset:
    """The preset called ``name``, or a ConfigurationError listing the known ones."""
    preset = PRESETS.get(name) if isinstance(name, str) else None
    if preset is None:
        raise ConfigurationError(f"unknown placement preset {name!r}; known presets: {', '.join(PRESETS)}.")
    return preset
