"""meansparse_pl: MeanSparse post-training robustness for PyTorch Lightning, with honest evaluation."""

from meansparse_pl.alpha_search import AlphaSearch, AlphaSearchResult, Exhaustive, SuccessiveHalving
from meansparse_pl.attacks import run_attack, worst_case
from meansparse_pl.calibration import CalibrationSummary, calibrate
from meansparse_pl.callback import AlphaSearchCallback, MeanSparseCallback
from meansparse_pl.checkpoint import load_checkpoint, save_checkpoint
from meansparse_pl.config import AttackConfig, DiagnosticsConfig, PlacementConfig, ThreatModel
from meansparse_pl.diagnostics import Diagnostics, diagnose
from meansparse_pl.errors import MeanSparseError
from meansparse_pl.ops import MeanSparse, alphas_of, backward_mode, get_alpha, operators, set_alpha
from meansparse_pl.placement import (
    Placement,
    Site,
    describe,
    find_sites,
    placement_of,
    register_activation,
    sparsify,
)
from meansparse_pl.published import convert_published
from meansparse_pl.robustness import RobustnessEvaluation

__version__ = "0.1.0"

__all__ = [
    "AlphaSearch",
    "AlphaSearchCallback",
    "AlphaSearchResult",
    "AttackConfig",
    "CalibrationSummary",
    "Diagnostics",
    "DiagnosticsConfig",
    "Exhaustive",
    "MeanSparse",
    "MeanSparseCallback",
    "MeanSparseError",
    "Placement",
    "PlacementConfig",
    "RobustnessEvaluation",
    "Site",
    "SuccessiveHalving",
    "ThreatModel",
    "alphas_of",
    "backward_mode",
    "calibrate",
    "convert_published",
    "describe",
    "diagnose",
    "find_sites",
    "get_alpha",
    "load_checkpoint",
    "operators",
    "placement_of",
    "register_activation",
    "run_attack",
    "save_checkpoint",
    "set_alpha",
    "sparsify",
    "worst_case",
]
