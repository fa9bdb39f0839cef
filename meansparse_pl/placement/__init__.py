"""Where MeanSparse operators go.

* :mod:`.registry`: what counts as an activation, and the named site rules (presets);
* :mod:`.record`: :class:`Site` and :class:`Placement`, the record that rebuilds a placement;
* :mod:`.fx`, :mod:`.hooks`, :mod:`.published_sites`: the three strategies;
* :mod:`.api`: :func:`sparsify`, :func:`sparsify_like`, :func:`find_sites`, :func:`describe`.

Presets. The paper places operators "before all activations" (preset ``activations``, the default). The
released MeanSparse models also put operators after residual sums and after MLP output projections; the
``published_*`` presets reproduce those sites (``docs/published_models.md``).
"""

from meansparse_pl.placement.api import describe, find_sites, sparsify, sparsify_like
from meansparse_pl.placement.record import Placement, Site, placement_of
from meansparse_pl.placement.registry import (
    ACTIVATION_FUNCTIONS,
    ACTIVATION_METHODS,
    ACTIVATION_MODULES,
    PRESETS,
    PlacementPreset,
    get_preset,
    register_activation,
    register_preset,
)

__all__ = [
    "ACTIVATION_FUNCTIONS",
    "ACTIVATION_METHODS",
    "ACTIVATION_MODULES",
    "PRESETS",
    "Placement",
    "PlacementPreset",
    "Site",
    "describe",
    "find_sites",
    "get_preset",
    "placement_of",
    "register_activation",
    "register_preset",
    "sparsify",
    "sparsify_like",
]
