"""Backbones created by name (timm style: one architecture per module, registered with a decorator).

Every created model takes images in [0, 1] and returns logits; with ``normalization`` the per-channel
normalisation is the model's first module (:class:`Normalize`), as attack libraries such as AutoAttack expect.

>>> from meansparse_pl.models import create_model
>>> model = create_model("wrn_28_10", num_classes=10, normalization=((0.49, 0.48, 0.45), (0.25, 0.24, 0.26)))
"""

from __future__ import annotations

# Importing the architecture modules registers them (one architecture family per module).
from meansparse_pl.models import preact_resnet, resnet, robustbench_zoo, small_cnn, wide_resnet  # noqa: F401
from meansparse_pl.models._registry import TORCHVISION_PREFIX, create_model, list_models, register_model
from meansparse_pl.models.activations import (
    PSiLU,
    PSSiLU,
    get_activation,
    list_activations,
    register_backbone_activation,
)
from meansparse_pl.models.layers import Normalize, NormalizedClassifier
from meansparse_pl.models.torchvision_models import list_torchvision_models

__all__ = [
    "TORCHVISION_PREFIX",
    "Normalize",
    "NormalizedClassifier",
    "PSSiLU",
    "PSiLU",
    "create_model",
    "get_activation",
    "list_activations",
    "list_models",
    "list_torchvision_models",
    "register_backbone_activation",
    "register_model",
]
