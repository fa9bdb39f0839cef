"""The MeanSparse operator and everything that computes it: the band formula (:mod:`.band`), the autograd
Functions of the backward modes (:mod:`.functions`), the fused CPU kernels (:mod:`.kernels`), the module
(:mod:`.meansparse`) and the whole-model helpers (:mod:`.model`)."""

from meansparse_pl.ops.band import inside_band
from meansparse_pl.ops.functions import BACKWARD_MODES, BackwardMode, check_backward_mode
from meansparse_pl.ops.kernels import (
    FusedActivation,
    fusable_activation,
    fused_kernels,
    fused_kernels_enabled,
    release_cached_outputs,
    set_fused_kernels,
)
from meansparse_pl.ops.meansparse import MeanSparse
from meansparse_pl.ops.model import (
    alphas_of,
    backward_mode,
    get_alpha,
    operators,
    require_operators,
    set_alpha,
    set_backward_mode,
    temporary_alpha,
)

__all__ = [
    "BACKWARD_MODES",
    "BackwardMode",
    "FusedActivation",
    "MeanSparse",
    "alphas_of",
    "backward_mode",
    "check_backward_mode",
    "fusable_activation",
    "fused_kernels",
    "fused_kernels_enabled",
    "get_alpha",
    "inside_band",
    "operators",
    "release_cached_outputs",
    "require_operators",
    "set_alpha",
    "set_backward_mode",
    "temporary_alpha",
    "set_fused_kernels",
]
