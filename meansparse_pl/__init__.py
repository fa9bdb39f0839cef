"""meansparse_pl: MeanSparse post-training robustness for PyTorch Lightning, with honest evaluation."""

from meansparse_pl.calibration import CalibrationSummary, calibrate
from meansparse_pl.checkpoint import load_checkpoint, save_checkpoint
from meansparse_pl.errors import MeanSparseError
from meansparse_pl.operator import MeanSparse, backward_mode, get_alpha, operators, set_alpha
from meansparse_pl.placement import Placement, Site, describe, find_sites, register_activation, sparsify

__version__ = "0.1.0"

__all__ = [
    "CalibrationSummary",
    "MeanSparse",
    "MeanSparseError",
    "Placement",
    "Site",
    "backward_mode",
    "calibrate",
    "describe",
    "find_sites",
    "get_alpha",
    "load_checkpoint",
    "operators",
    "register_activation",
    "save_checkpoint",
    "set_alpha",
    "sparsify",
]
