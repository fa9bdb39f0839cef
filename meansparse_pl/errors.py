"""Error types. Every error a user can cause derives from MeanSparseError, so the CLI can print its one-line
message instead of a traceback, and every message names the problem and the fix."""

from __future__ import annotations


class MeanSparseError(Exception):
    """Base class of every user-facing error in meansparse_pl."""


class ConfigurationError(MeanSparseError, ValueError):
    """A bad argument or configuration value (negative alpha, epsilon <= 0, unknown name, ...)."""


class UncalibratedOperatorError(MeanSparseError, RuntimeError):
    """A MeanSparse operator was used before its channel statistics were collected."""


class StatisticsError(MeanSparseError, ValueError):
    """Channel statistics that cannot be right: NaN / Inf, wrong shape, negative variance."""


class PlacementError(MeanSparseError, ValueError):
    """No activation found, a rule that matches nothing, or a model that cannot be traced."""


class CheckpointError(MeanSparseError, ValueError):
    """A corrupt, truncated, foreign or incompatible checkpoint file."""


class DataNotFoundError(MeanSparseError, FileNotFoundError):
    """A data set is not where it was looked for."""


class DataFormatError(MeanSparseError, ValueError):
    """A data file exists but is not in the expected format (bad magic number, truncated, wrong shape)."""
