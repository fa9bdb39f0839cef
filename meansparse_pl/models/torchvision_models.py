"""Any torchvision classification model by name (``create_model("torchvision:resnet50", ...)``).

Weights are never downloaded (``weights=None``): the machines this runs on may be offline, and a robust
checkpoint is loaded afterwards anyway.
"""

from __future__ import annotations

import torchvision
from torch import nn

from meansparse_pl.errors import ConfigurationError
from meansparse_pl.models.activations import get_activation

__all__ = ["build_torchvision_model", "list_torchvision_models"]


def list_torchvision_models() -> list[str]:
    """torchvision's classification model names (not detection / segmentation / video)."""
    return sorted(torchvision.models.list_models(module=torchvision.models))


def build_torchvision_model(
    name: str, *, num_classes: int, in_channels: int, activation: str, **kwargs: object
) -> nn.Module:
    """``torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kwargs)``.

    torchvision models are built for 3-channel images, so ``in_channels`` must be 3. With the default
    ``activation="relu"`` the model keeps its own activations; any other name replaces every ``nn.ReLU``
    module by a new instance of that activation. Note that some torchvision models (e.g. the ResNets) call
    one ReLU module several times; it stays one (replaced) module there, since the call sites are in
    torchvision's ``forward`` code.
    """
    valid = list_torchvision_models()
    if name not in valid:
        raise ConfigurationError(
            f"unknown torchvision classification model {name!r}; valid names: {', '.join(valid)}"
        )
    if in_channels != 3:
        raise ConfigurationError(f"torchvision models take 3 input channels, got in_channels={in_channels}")
    if "weights" in kwargs:
        raise ConfigurationError("torchvision models are built with weights=None; load a checkpoint instead")
    try:
        model = torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kwargs)
    except TypeError as error:
        raise ConfigurationError(f"torchvision model {name!r} rejected its arguments: {error}") from None
    if activation != "relu":
        replaced = 0
        for parent in list(model.modules()):
            for child_name, child in list(parent.named_children()):
                if isinstance(child, nn.ReLU):
                    setattr(parent, child_name, get_activation(activation))
                    replaced += 1
        if replaced == 0:
            raise ConfigurationError(
                f"torchvision model {name!r} has no nn.ReLU modules to replace by {activation!r}; "
                "use activation='relu' to keep its own activations"
            )
    return model
